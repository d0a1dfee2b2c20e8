"""Optional integrations with training libraries. Each submodule imports its library on import:
``taopd_kernels.integrations.trl`` needs ``trl>=1.16``; importing this package needs nothing."""
