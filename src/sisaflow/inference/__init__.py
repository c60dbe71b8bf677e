"""Serving the constituents as one model: the registry of served versions (`registry`), the ensemble and its
mixture (`ensemble`), the runners that evaluate all constituents per step behind one interface (`runners`:
the stacked from-scratch forward in `stacked` with its cache in `stacked_cache`, and the LoRA runners in
`lora_runners`), the transformers wrapper (`hf`) and classification (`classify`).
Imports: `core`, `data`, `models`, `training`."""
