"""Mislabeled-sample detection benchmark (SPEC §3.18): noisy labels, training procedures, calculator factories,
the evaluator and a command line (``python -m deel.influenciae.benchmark`` / ``influenciae-benchmark``), and the
digits data and model builders shared with the demo and the performance scripts (:mod:`.digits`).

Importing this package is cheap: scikit-learn, matplotlib and the CIFAR-10 data are only loaded when used.
"""
from .base_benchmark import BaseTrainingProcedure, MislabelingDetectorEvaluator
from .cifar10_benchmark import (Cifar10MislabelingDetectorEvaluator, Cifar10TrainingProcedure, ConvNetCIFAR,
                                cifar10_datasets, load_cifar10)
from .digits import DigitsSplit, build_mlp, load_digits_arrays, load_digits_split, one_hot, train_classifier
from .digits_benchmark import (DigitsMislabelingDetectorEvaluator, DigitsTrainingProcedure, build_digits_model,
                               load_digits_datasets)
from .influence_factory import (ArnoldiCalculatorFactory, FirstOrderFactory, InfluenceCalculatorFactory,
                                LossRankingCalculator, LossRankingFactory, RPSL2Factory, RPSLJEFactory,
                                SampleBoundaryCalculatorFactory, TracInFactory, WeightsBoundaryCalculatorFactory,
                                ihvp_modes)
from .noise import draw_noisy_labels

__all__ = [
    "BaseTrainingProcedure", "MislabelingDetectorEvaluator", "draw_noisy_labels",
    "Cifar10MislabelingDetectorEvaluator", "Cifar10TrainingProcedure", "ConvNetCIFAR", "cifar10_datasets",
    "load_cifar10", "DigitsMislabelingDetectorEvaluator", "DigitsTrainingProcedure", "build_digits_model",
    "load_digits_datasets",
    "ArnoldiCalculatorFactory", "FirstOrderFactory", "InfluenceCalculatorFactory", "LossRankingCalculator",
    "LossRankingFactory", "RPSL2Factory", "RPSLJEFactory", "SampleBoundaryCalculatorFactory", "TracInFactory",
    "WeightsBoundaryCalculatorFactory", "ihvp_modes", "DigitsSplit", "build_mlp", "load_digits_arrays",
    "load_digits_split", "one_hot", "train_classifier",
]
