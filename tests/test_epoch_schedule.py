"""llm.train_config.per_epoch: a TrainConfig scheduled in epochs."""

import pytest

from llm.errors import LLMError
from llm.train_config import PER_EPOCH_FIELDS, TrainConfig, per_epoch


@pytest.mark.parametrize(
    ("n_examples", "batch_size", "grad_accum", "steps_per_epoch"),
    [(84, 8, 1, 11), (80, 8, 1, 10), (81, 8, 1, 11), (100, 4, 5, 5), (1, 16, 1, 1)],
)
def test_an_epoch_is_the_steps_that_cover_every_example(
    n_examples: int, batch_size: int, grad_accum: int, steps_per_epoch: int
) -> None:
    config = TrainConfig(batch_size=batch_size, grad_accum=grad_accum, eval_every=7, checkpoint_every=3)
    scheduled = per_epoch(config, 3, n_examples)
    assert scheduled.max_steps == 3 * steps_per_epoch
    assert scheduled.eval_every == scheduled.checkpoint_every == steps_per_epoch
    assert scheduled.best_metric == "val_loss" and scheduled.restore_best is True


def test_only_the_epoch_fields_change() -> None:
    config = TrainConfig(lr=3e-3, min_lr=3e-4, batch_size=8, patience=2, seed=7, best_metric="val_accuracy")
    scheduled = per_epoch(config, 2, 40)
    changed = {name for name in TrainConfig.__dataclass_fields__ if getattr(config, name) != getattr(scheduled, name)}
    assert changed == set(PER_EPOCH_FIELDS)


@pytest.mark.parametrize(("epochs", "n_examples"), [(0, 10), (-1, 10), (2, 0)])
def test_empty_schedules_are_rejected(epochs: int, n_examples: int) -> None:
    with pytest.raises(LLMError, match="per_epoch needs epochs >= 1 and n_examples >= 1"):
        per_epoch(TrainConfig(), epochs, n_examples)
