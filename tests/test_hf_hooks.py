"""The MeZO trainers hold their step logic (composition, no mixin): ``MeZOTrainer`` and ``MeZOSFTTrainer`` each
define their overrides as delegations to one ``MeZOHooks``, whose state lives in it, not in the trainer."""
import inspect

import pytest

pytest.importorskip("transformers")
import mezo_kernels.hf as hf  # noqa: E402
from mezo_kernels.hf import MeZOHooks, MeZOTrainer  # noqa: E402

OVERRIDES = ("__init__", "create_optimizer", "training_step", "log", "mezo")


def _trainers():
    out = [MeZOTrainer]
    try:
        out.append(hf.MeZOSFTTrainer)
    except ImportError:               # TRL is optional
        pass
    return out


def test_there_is_no_mixin_any_more():
    assert not hasattr(hf, "MeZOTrainerMixin") and "MeZOTrainerMixin" not in hf.__all__
    import transformers
    assert MeZOTrainer.__bases__ == (transformers.Trainer,)
    if len(_trainers()) > 1:
        import trl
        assert hf.MeZOSFTTrainer.__bases__ == (trl.SFTTrainer,)


@pytest.mark.parametrize("cls", _trainers(), ids=lambda c: c.__name__)
def test_each_trainer_defines_its_overrides_as_delegations(cls):
    for name in OVERRIDES:
        assert name in vars(cls), name
        member = vars(cls)[name]
        src = inspect.getsource(member.fget if isinstance(member, property) else member)
        assert "MeZOHooks" in src or "mezo_hooks" in src, name
        assert len(src.strip().splitlines()) <= 6, name          # thin: the logic is the hooks'


def test_the_hooks_take_their_keywords_and_refuse_bad_ones():
    kwargs = {"eps": 1e-2, "n_directions": 2, "mezo_seed": 7, "distribution": "rademacher", "train_dataset": None}
    hooks = MeZOHooks.take("T", (), kwargs)
    assert kwargs == {"train_dataset": None}                      # the rest goes to the Trainer
    assert hooks.settings["eps"] == 1e-2 and hooks.settings["n_directions"] == 2 and hooks.mezo_seed == 7
    with pytest.raises(ValueError, match="eps must be"):
        MeZOHooks.take("T", (), {"eps": 0.0})
    with pytest.raises(ValueError, match="T builds its MeZO optimizer"):
        MeZOHooks.take("T", (), {"optimizers": (object(), None)})
