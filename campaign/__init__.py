"""Campaign manager: YAML spec -> plan of jobs -> Ray actors -> MLflow."""
