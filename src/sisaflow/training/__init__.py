"""Training one constituent slice by slice (`loop`), its checkpoints and their metadata (`checkpoint`), the hash
chain that says which checkpoints are still valid for the current data (`lineage`), and the Ray launcher that
trains shards in parallel (`ray_launcher`). Imports: `core`, `data`, `models`."""
