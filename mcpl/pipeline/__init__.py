"""Many jobs: data (table -> manifest -> jobs), the runner and its observers, tracking, registry, report."""
