"""Top-1 accuracy, as a local `evaluate` metric script (loaded by path: no Hub access).

`evaluate` copies this file into its modules cache and imports it from there, so it must stay
self-contained: no relative imports, only libraries `evaluate` itself depends on.
"""

import datasets
import evaluate
import numpy as np


_DESCRIPTION = "Fraction of predictions equal to their reference label: (1 / N) * sum_i [prediction_i == reference_i]."

_KWARGS_DESCRIPTION = """
Args:
    predictions (`list` of `int`): Predicted class ids.
    references (`list` of `int`): True class ids.
Returns:
    accuracy (`float`): In [0, 1]; 0.0 when there are no predictions.
Examples:
    >>> accuracy = evaluate.load("hf_moe/metrics/accuracy")
    >>> accuracy.compute(predictions=[0, 1, 2, 1], references=[0, 1, 1, 1])
    {'accuracy': 0.75}
"""

_CITATION = ""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class Accuracy(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features({"predictions": datasets.Value("int64"), "references": datasets.Value("int64")}),
        )

    def _compute(self, predictions, references):
        predictions, references = np.asarray(predictions), np.asarray(references)
        if len(predictions) == 0:
            return {"accuracy": 0.0}
        return {"accuracy": float((predictions == references).mean())}
