"""Training new adapter versions from the watch folder.

inbox (watch, debounce, snapshot) → validate (ingest, quarantine) with recipe (recipe.toml) → datasets (CPT/SFT
samples, replay mixing) → train/run (child process) → evaluate (gate). Import the modules themselves; this package
imports nothing, so reading a recipe or watching the inbox never loads MLX.
"""
