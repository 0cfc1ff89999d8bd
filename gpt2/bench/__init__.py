"""What the entry points in scripts/ share: benchmark measurements, reports and models at set shapes."""
