"""Unit tests of the DeepFM hyper-parameters both modes' DeepFM models share (``DeepFMParams``)."""

from __future__ import annotations

import pytest

from kubeai_train.tf import CtrFeatures, DeepFM, DeepFMParams, TrainError
from kubeai_train.tf import coordinator as coord

MODELS = [DeepFM, coord.DeepFMModuleModel]


@pytest.mark.parametrize("cls", MODELS)
@pytest.mark.parametrize(
    ("kwargs", "needle"),
    [
        ({"embedding_dim": 0}, "embedding_dim must be >= 1, got 0"),
        ({"learning_rate": 0.0}, "learning_rate must be > 0"),
    ],
)
def test_both_models_reject_the_same_bad_hyper_parameters(cls, kwargs, needle):
    with pytest.raises(TrainError, match=needle):
        cls(**kwargs)
    with pytest.raises(TrainError, match=needle):
        DeepFMParams(**kwargs)


def test_both_models_have_the_same_defaults_and_params():
    feats = CtrFeatures(hash_buckets=500)
    bg, co = DeepFM(features=feats, hidden=[16]), coord.DeepFMModuleModel(features=feats, hidden=[16])
    assert bg.hparams == co.hparams == DeepFMParams(features=feats, hidden=(16,))
    assert bg.params() == co.params() and bg.params()["hidden"] == [16] and bg.params()["hash_buckets"] == 500
    assert bg.learning_rate == co.learning_rate() == 0.05 and bg.embedding_dim == co.embedding_dim == 8
    assert DeepFM().features.raw_features() == coord.DeepFMModuleModel().raw_features()
