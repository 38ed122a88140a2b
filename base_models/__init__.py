"""Base models F: the networks whose outputs a code protects.

Every base model class is built as ``cls(in_shape=(C, H, W), num_classes=n)``;
a plain torch function is F as it is (base_models/functions.py).
Short names map to class paths in :data:`MODEL_ALIASES`; any importable class
with that constructor works too.
"""
from util.moved import keep_moved_names

MODEL_ALIASES = {
    "base-mlp": "base_models.mlp.BaseMLP",
    "logistic": "base_models.logistic.LogisticRegression",
    "lenet5": "base_models.lenet.LeNet5",
    "resnet18": "base_models.resnet.ResNet18",
}


# ``python -m base_models.train`` (the command before the rename) runs base_models.fit.
keep_moved_names(__name__, {"train": "fit"})
