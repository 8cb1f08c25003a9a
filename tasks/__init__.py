"""seqio Task/Mixture registrations, imported by module name (see config.data.task_modules)."""
