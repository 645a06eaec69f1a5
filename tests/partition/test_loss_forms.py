"""IMP's loss_fn takes (model, batch); a loss of the usual (outputs, targets) form is accepted
where it can be recognised, and otherwise gets an error that says how to wrap it."""

import pytest
import torch
from torch import nn

import padnet
from padnet.partition import partition_model


def model_and_data():
    torch.manual_seed(0)
    model = padnet.dynamize(nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Conv2d(4, 4, 3),
                                          nn.Flatten(), nn.Linear(64, 3)),
                            "dyconv", init="copy_noise", copy_noise_std=0.1)
    data = [(torch.randn(8, 1, 8, 8), torch.randint(0, 3, (8,))) for _ in range(2)]
    return model, data


@pytest.mark.parametrize("loss", [nn.CrossEntropyLoss(), nn.functional.cross_entropy])
def test_a_torch_loss_of_outputs_and_targets_is_accepted(loss) -> None:
    model, data = model_and_data()
    result = partition_model(model, data, dynamic_ratio=0.5, loss_fn=loss)
    reference, _ = model_and_data()
    expected = partition_model(reference, data, dynamic_ratio=0.5)  # the default loss
    assert result.num_dynamic == expected.num_dynamic
    for a, b in zip(padnet.layers.mode_masks(model), padnet.layers.mode_masks(reference),
                    strict=True):
        assert torch.equal(a[1].mask, b[1].mask)


def test_another_two_argument_loss_gets_an_error_that_shows_the_wrapper() -> None:
    model, data = model_and_data()

    def my_loss(outputs, targets):
        return (outputs.softmax(-1) - nn.functional.one_hot(targets, 3)).square().mean()

    with pytest.raises(TypeError, match=r"loss_fn\(model, batch\).*lambda model, batch"):
        partition_model(model, data, dynamic_ratio=0.5, loss_fn=my_loss)
