"""A fake pynvml: put this directory first on PYTHONPATH and `import pynvml` loads pynvml.py here."""
