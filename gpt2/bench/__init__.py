"""What the entry points in scripts/ share: V-cache benchmark measurements and
reports, models at set shapes, the GPU cost model."""
