"""Model registry: inputs in [0, 1] with normalisation inside, logits out, YOPO's first layer."""
import pytest
import torch

from atcd_ray.core.models import MODELS, build_model, first_layer

SHAPES = {"smallcnn": (1, 28), "compactcnn": (1, 28), "preactresnet18": (3, 32), "wrn34-10": (3, 32), "resnet50": (3, 64)}


@pytest.mark.parametrize("name", MODELS)
def test_forward_shapes_and_first_layer(name):
    channels, size = SHAPES[name]
    torch.manual_seed(0)
    model = build_model(name, 7, channels, mean=[0.5] * channels, std=[0.25] * channels).eval()
    with torch.no_grad():
        out = model(torch.rand(2, channels, size, size))
    assert out.shape == (2, 7) and torch.isfinite(out).all()
    assert isinstance(first_layer(model), torch.nn.Conv2d) and first_layer(model).in_channels == channels
    assert len(model.state_dict()) == len(dict(model.named_parameters())) + len(dict(model.named_buffers()))


def test_normalisation_is_a_buffer_inside_the_model():
    model = build_model("smallcnn", 10, 1, mean=[0.5], std=[0.25])
    assert torch.equal(model.mean.flatten(), torch.tensor([0.5])) and "mean" in dict(model.named_buffers())
    x = torch.rand(3, 1, 28, 28)
    model.eval()
    torch.testing.assert_close(model(x), model.net((x - 0.5) / 0.25))


def test_unknown_model():
    with pytest.raises(ValueError, match="unknown model 'vgg'; allowed: smallcnn"):
        build_model("vgg", 10, 1)
