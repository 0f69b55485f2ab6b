"""A fake amdsmi package: put this directory first on PYTHONPATH and `import amdsmi` loads it."""
