"""Recall@k for retrieval, as a local `evaluate` metric script (loaded by path: no Hub access).

Each query comes with its ranked candidates (best first; only the first max(k) are needed) and the set of
candidates that are correct for it. A query counts as a hit at k when ANY of its correct candidates is among
its first k; recall@k is the fraction of hits. This is the R@k of image-text retrieval (CLIP, COCO/Flickr30k
5-caption protocol): an image is retrieved correctly if any of its captions is in the top k.

`evaluate` copies this file into its modules cache and imports it from there, so it must stay
self-contained: no relative imports, only libraries `evaluate` itself depends on.
"""

import datasets
import evaluate


_DESCRIPTION = "Fraction of queries with at least one relevant candidate among their k best-ranked candidates."

_KWARGS_DESCRIPTION = """
Args:
    predictions (`list` of `list` of `int`): Per query, candidate ids ranked best first (at least max(k) of them,
        or all candidates when there are fewer).
    references (`list` of `list` of `int`): Per query, the ids of the relevant candidates (at least one).
    k (`int` or `list` of `int`, defaults to `[1, 5, 10]`): The cut-offs.
Returns:
    `recall@{k}` (`float`) for every k: in [0, 1]; 0.0 when there are no queries.
Examples:
    >>> recall = evaluate.load("hf_moe/metrics/recall_at_k")
    >>> recall.compute(predictions=[[2, 0, 1], [1, 2, 0]], references=[[0], [0, 2]], k=[1, 2])
    {'recall@1': 0.0, 'recall@2': 1.0}
"""

_CITATION = ""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class RecallAtK(evaluate.Metric):
    def _info(self):
        ids = datasets.Sequence(datasets.Value("int64"))
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features({"predictions": ids, "references": ids}),
        )

    def _compute(self, predictions, references, k=(1, 5, 10)):
        cutoffs = [k] if isinstance(k, int) else list(k)
        if any(int(cutoff) < 1 for cutoff in cutoffs):
            raise ValueError(f"Every k must be >= 1, got {cutoffs}.")
        # Rank (0-based) of the best-ranked relevant candidate of each query; None when none is in the list.
        first_hits = []
        for ranked, relevant in zip(predictions, references):
            if len(relevant) == 0:
                raise ValueError("Every query needs at least one relevant candidate in `references`.")
            relevant = set(relevant)
            first_hits.append(next((rank for rank, candidate in enumerate(ranked) if candidate in relevant), None))
        total = len(first_hits)
        return {
            f"recall@{int(cutoff)}": (
                sum(rank is not None and rank < int(cutoff) for rank in first_hits) / total if total else 0.0
            )
            for cutoff in cutoffs
        }
