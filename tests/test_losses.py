import math

import torch

from instructgpt_cli.batches import IGNORE_INDEX
from instructgpt_cli.losses import sft_loss_sum


def test_sft_loss_counts_only_response_tokens_by_hand():
    # Sequence of 4 tokens; labels mask the prompt (position 0, 1) -> targets are positions 2 and 3,
    # predicted by logits at positions 1 and 2. Position 0's and 3's logits must not matter.
    logits = torch.tensor([[[9.0, -9.0], [0.0, 0.0], [math.log(3.0), 0.0], [5.0, 5.0]]])
    labels = torch.tensor([[IGNORE_INDEX, IGNORE_INDEX, 0, 1]])
    loss_sum, n = sft_loss_sum(logits, labels)
    # position 1 predicts token 0 from [0, 0]: -log(1/2); position 2 predicts token 1 from [log3, 0]: -log(1/4)
    assert int(n) == 2
    assert math.isclose(loss_sum.item(), math.log(2) + math.log(4), rel_tol=1e-6)


def test_sft_loss_ignores_padding_rows():
    logits = torch.zeros(2, 3, 5)
    labels = torch.tensor([[IGNORE_INDEX, 1, 2], [IGNORE_INDEX, IGNORE_INDEX, IGNORE_INDEX]])
    loss_sum, n = sft_loss_sum(logits, labels)
    assert int(n) == 2
    assert math.isclose(loss_sum.item(), 2 * math.log(5), rel_tol=1e-6)
