"""MoDE (mixture of data experts): CLIP data experts trained on caption clusters, ensembled per task.

Pipeline: `hf-moe mode embed` (caption embeddings) -> `hf-moe mode cluster` (fine + coarse balanced k-means,
assignment of every pair) -> `hf-moe mode train-expert` (one CLIP per coarse cluster) -> `hf-moe mode build`
(one `MoDEModel`) -> `hf-moe mode report`. The model is `hf_moe.modeling.MoDEModel`.
"""
