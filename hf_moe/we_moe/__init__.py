"""WEMoE and E-WEMoE (weight-ensembling mixture of experts): fine-tuned CLIP vision models merged into one model
whose MLPs mix the tasks' task vectors per sample, with test-time adaptation of the routers on unlabeled data.

The model is `hf_moe.modeling.WEMoECLIPModel` (and the vision-tower classes); the converter is in
`hf_moe.conversion`; the merge baselines are in `hf_moe.merging`.
"""
