"""CLIP-MoE (Diversified Multiplet Upcycling): MCL expert extraction (`mcl`), router training (`trainer`,
`train_router`), LoRA (`lora`), the `hf-moe` commands (`commands`) and the demo (`demo`).

The model itself is `hf_moe.modeling.CLIPMoEModel`; the converters are in `hf_moe.conversion`.
"""
