"""Science package of the Boltzmann-generator campaign manager.

Systems (potential energies with reference properties), base states, normalizing flows,
replica-exchange MCMC for reference data, training objectives, free-energy estimators
(importance weighting / LFEP, LBAR, MBAR) and diagnostic plots.

Depends only on torch, numpy, scipy, pymbar and matplotlib, so it is usable from a notebook
without Ray or MLflow. All flow math is float64. Toy systems are in reduced units: temperature
means kT and free energies f = -ln Z are dimensionless (in kT); see docs/architecture.md,
Conventions.
"""
