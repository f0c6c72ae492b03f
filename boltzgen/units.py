"""Physical constants (CODATA 2018 exact SI values expressed in molecular units)."""

#: Boltzmann constant k_B in kJ/mol/K (R = N_A k_B = 8.31446261815324 J/mol/K, exact since 2019).
KB_KJ_PER_MOL_K: float = 0.00831446261815324
