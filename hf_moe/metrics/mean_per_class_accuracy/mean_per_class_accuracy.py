"""Mean per-class accuracy (balanced accuracy), as a local `evaluate` metric script (loaded by path: no Hub access).

The CLIP paper's metric for FGVC-Aircraft, Oxford-IIIT Pets, Caltech-101 and Flowers-102 (MetaCLIP's
`clipeval/eval_zeroshot.py::mean_per_class`, CLIP_benchmark's `mean_per_class_recall`): the recall of each class
present in the references, averaged over those classes. It equals scikit-learn's `balanced_accuracy_score`.

`evaluate` copies this file into its modules cache and imports it from there, so it must stay
self-contained: no relative imports, only libraries `evaluate` itself depends on.
"""

import datasets
import evaluate
import numpy as np


_DESCRIPTION = (
    "Mean over the classes present in the references of per-class recall: "
    "(1 / |C|) * sum_{c in C} |{i: prediction_i = reference_i = c}| / |{i: reference_i = c}|, C: the reference classes."
)

_KWARGS_DESCRIPTION = """
Args:
    predictions (`list` of `int`): Predicted class ids.
    references (`list` of `int`): True class ids.
Returns:
    mean_per_class_accuracy (`float`): In [0, 1]; 0.0 when there are no references. Classes that are only
        predicted, never a reference, do not count (they have no recall).
Examples:
    >>> metric = evaluate.load("hf_moe/metrics/mean_per_class_accuracy")
    >>> metric.compute(predictions=[0, 0, 0, 1], references=[0, 0, 0, 1])
    {'mean_per_class_accuracy': 1.0}
    >>> metric.compute(predictions=[0, 0, 0, 0], references=[0, 0, 0, 1])
    {'mean_per_class_accuracy': 0.5}
"""

_CITATION = ""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class MeanPerClassAccuracy(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features({"predictions": datasets.Value("int64"), "references": datasets.Value("int64")}),
        )

    def _compute(self, predictions, references):
        predictions, references = np.asarray(predictions), np.asarray(references)
        if len(references) == 0:
            return {"mean_per_class_accuracy": 0.0}
        classes, inverse = np.unique(references, return_inverse=True)
        correct = np.bincount(inverse, weights=(predictions == references).astype(np.float64), minlength=len(classes))
        totals = np.bincount(inverse, minlength=len(classes))
        return {"mean_per_class_accuracy": float((correct / totals).mean())}
