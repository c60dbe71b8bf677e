"""What a constituent is made of: the from-scratch transformer (`scratch`), the pretrained base and its checks
(`pretrained`, set up by `base_setup`), LoRA adapters over it (`lora`), and the tokenizers (`tokenizer`). Nothing
here depends on deletable data: the tokenizer and base are shared by all constituents. Imports: `core`."""
