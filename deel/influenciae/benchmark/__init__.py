"""Mislabeled-sample detection benchmark (SPEC §3.18): noisy labels, training procedures, calculator factories,
the evaluator and a command line (``python -m deel.influenciae.benchmark`` / ``influenciae-benchmark``).

Importing this package is cheap: scikit-learn, matplotlib and the CIFAR-10 data are only loaded when used.
"""
from .base_benchmark import BaseTrainingProcedure, MislabelingDetectorEvaluator, draw_noisy_labels
from .cifar10_benchmark import (Cifar10MislabelingDetectorEvaluator, Cifar10TrainingProcedure, ConvNetCIFAR,
                                cifar10_datasets, load_cifar10)
from .digits_benchmark import (DigitsMislabelingDetectorEvaluator, DigitsTrainingProcedure, build_digits_model,
                               load_digits_datasets)
from .influence_factory import (ArnoldiCalculatorFactory, FirstOrderFactory, InfluenceCalculatorFactory,
                                LossRankingCalculator, LossRankingFactory, RPSL2Factory, RPSLJEFactory,
                                SampleBoundaryCalculatorFactory, TracInFactory, WeightsBoundaryCalculatorFactory)

__all__ = [
    "BaseTrainingProcedure", "MislabelingDetectorEvaluator", "draw_noisy_labels",
    "Cifar10MislabelingDetectorEvaluator", "Cifar10TrainingProcedure", "ConvNetCIFAR", "cifar10_datasets",
    "load_cifar10", "DigitsMislabelingDetectorEvaluator", "DigitsTrainingProcedure", "build_digits_model",
    "load_digits_datasets",
    "ArnoldiCalculatorFactory", "FirstOrderFactory", "InfluenceCalculatorFactory", "LossRankingCalculator",
    "LossRankingFactory", "RPSL2Factory", "RPSLJEFactory", "SampleBoundaryCalculatorFactory", "TracInFactory",
    "WeightsBoundaryCalculatorFactory",
]
