"""MoIIE (mixture of intra- and inter-modality experts): a LLaVA-shaped vision-language model whose MoE decoder
layers hold vision-only, shared and language-only experts, upcycled from a dense LLM + SigLIP.

The model is `hf_moe.modeling.MoIIEPhi3ForCausalLM`; the converter is in `hf_moe.conversion`.
"""
