"""Small shared helpers: class-path resolution, shapes, devices, atomic files."""
