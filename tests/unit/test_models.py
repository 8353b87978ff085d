"""Model specs: built-ins, TOML files, the proto form, resolution over a data set's shape, and the
registry of layer kinds that every adapter's tables must cover."""

import ast
import subprocess
import sys

import pytest

from jax_service import layout as flax_layout
from keras_service import layout as keras_layout
from tests.support import REPO
from weightrelay import layers, layouts, models
from weightrelay.models import BatchNorm, Conv2D, Dense, Flatten, MaxPool2D, ModelSpec, SpecError
from weightrelay.v1 import worker_pb2 as pb


def shapes(model: models.ResolvedModel) -> dict[str, tuple[int, ...]]:
    return {name: spec.shape for name, spec in model.manifest.items()}


def test_the_default_mlp_is_the_seed_architecture():
    model = models.resolve(models.builtin("mlp"), (1, 28, 28), 10)
    assert shapes(model) == {
        "fc1.weight": (128, 784), "fc1.bias": (128,),
        "fc2.weight": (64, 128), "fc2.bias": (64,),
        "fc3.weight": (10, 64), "fc3.bias": (10,),
    }
    assert model.parameter_count == 109_386
    assert all(spec.dtype == "float32" and not spec.buffer for spec in model.manifest.values())


def test_mlp_with_widths_and_its_size():
    model = models.resolve(models.builtin("mlp:16384,16384"), (1, 28, 28), 10)
    assert shapes(model)["fc2.weight"] == (16384, 16384)
    assert 1.0 < model.parameter_count * 4 / 2**30 < 1.1  # the 1 GiB weight set of the transfer benchmark
    assert models.builtin("MLP:512, 256").name == "mlp:512,256"


def test_lenet_on_mnist_and_on_cifar10():
    mnist = models.resolve(models.builtin("lenet"), (1, 28, 28), 10)
    assert shapes(mnist)["conv1.weight"] == (6, 1, 5, 5) and shapes(mnist)["fc1.weight"] == (120, 400)
    cifar = models.resolve(models.builtin("lenet"), (3, 32, 32), 10)
    assert shapes(cifar)["conv1.weight"] == (6, 3, 5, 5) and shapes(cifar)["fc1.weight"] == (120, 576)
    fc1 = next(r for r in cifar.layers if r.name == "fc1")
    assert fc1.flattened_from == (16, 6, 6)  # the layer whose kernel Keras permutes


def test_cnn_bn_marks_running_statistics_as_buffers():
    model = models.resolve(models.builtin("cnn-bn"), (1, 28, 28), 10)
    buffers = sorted(name for name, spec in model.manifest.items() if spec.buffer)
    assert buffers == [f"bn{i}.{part}" for i in (1, 2, 3) for part in ("running_mean", "running_var")]
    assert shapes(model)["bn1.weight"] == (16,) and shapes(model)["bn3.running_var"] == (64,)


@pytest.mark.parametrize("size,kernel,stride,expected", [(28, 5, 1, (2, 2)), (28, 4, 1, (1, 2)), (7, 3, 2, (1, 1)), (8, 3, 2, (0, 1)), (5, 1, 1, (0, 0))])
def test_same_padding_follows_tensorflow(size, kernel, stride, expected):
    assert models.same_padding(size, kernel, stride) == expected
    before, after = expected
    assert (size + before + after - kernel) // stride + 1 == -(-size // stride)


def test_a_model_file(tmp_path):
    path = tmp_path / "tiny.toml"
    path.write_text('''
name = "tiny-cnn"
[[layers]]
kind = "conv2d"
filters = 4
kernel = 3
padding = "same"
activation = "relu"
[[layers]]
kind = "maxpool2d"
size = 2
[[layers]]
kind = "flatten"
[[layers]]
kind = "dense"
units = "classes"
name = "head"
''')
    spec = models.load_model(str(path))
    assert spec.name == "tiny-cnn"
    model = models.resolve(spec, (1, 28, 28), 10)
    assert shapes(model) == {"conv1.weight": (4, 1, 3, 3), "conv1.bias": (4,), "head.weight": (10, 784), "head.bias": (10,)}
    assert models.spec_from_dict(models.spec_to_dict(spec)) == spec


@pytest.mark.parametrize("text,message", [
    ('[[layers]]\nkind = "lstm"', "unknown kind 'lstm'"),
    ('[[layers]]\nkind = "dense"\nunits = 10\nactivation = "swish"', "activation 'swish' is not one of"),
    ('[[layers]]\nkind = "dense"\nwidth = 10', "unknown key(s) width"),
    ('[[layers]]\nkind = "dropout"\nrate = 1.5', "rate must be a number in [0, 1)"),
    ('[[layers]]\nkind = "batchnorm"\nmomentum = 0', "momentum must be a number in (0, 1)"),
    ('[[layers]]\nkind = "conv2d"\nfilters = 0', "filters must be a whole number of at least 1"),
    ('name = "x"', "no layers"),
])
def test_bad_model_files_name_the_layer_and_the_fix(tmp_path, text, message):
    path = tmp_path / "bad.toml"
    path.write_text(text)
    with pytest.raises(SpecError) as info:
        models.load_model(str(path))
    assert message in str(info.value)


@pytest.mark.parametrize("spec,message", [
    (ModelSpec("x", (Dense(10),)), "a dense layer needs flat input"),
    (ModelSpec("x", (Flatten(), Dense(7))), "ends in shape [7], but the data set has 10 classes"),
    (ModelSpec("x", (Conv2D(4, 30), Flatten(), Dense(0))), "does not fit input [1, 28, 28]"),
    (ModelSpec("x", (Flatten(), Dense(5, name="a"), Dense(0, name="a"))), "the name 'a' is used twice"),
    (ModelSpec("x", (Flatten(), Dense(5, name="fc2"), Dense(0))), "the name 'fc2' is used twice"),
    (ModelSpec("x", (Flatten(), MaxPool2D(2), Dense(0))), "maxpool2d needs (C, H, W) input"),
    (ModelSpec("x", (Conv2D(4, 3), Flatten(), BatchNorm(), Dense(0))), "batchnorm right after flattening"),
    (ModelSpec("x", (Flatten(), Dense(5, name="bad.name"), Dense(0))), "must be letters, digits and _"),
])
def test_specs_that_do_not_fit_are_refused(spec, message):
    with pytest.raises(SpecError) as info:
        models.resolve(spec, (1, 28, 28), 10)
    assert message in str(info.value)


def test_unknown_builtin_lists_the_choices():
    with pytest.raises(SpecError, match="unknown model 'resnet'; use mlp"):
        models.builtin("resnet")
    with pytest.raises(SpecError, match="hidden widths"):
        models.builtin("mlp:12,x")


@pytest.mark.parametrize("name", ["mlp", "mlp:32,16,8", "lenet", "cnn-bn"])
def test_proto_round_trip(name):
    spec = models.resolve(models.builtin(name), (3, 32, 32), 10).spec
    message = models.to_proto(spec)
    assert models.from_proto(message) == spec
    assert models.from_proto(type(message)(name=name)) == models.builtin(name)  # a name alone is a built-in


def test_describe_is_one_line_with_shapes():
    line = models.resolve(models.builtin("lenet"), (1, 28, 28), 10).describe()
    assert line.startswith("lenet: 1x28x28 -> conv1 conv2d 6@5x5/1 same relu [6x28x28]") and line.endswith("fc3 dense 10 [10]")


def test_a_second_flatten_keeps_the_order_of_the_first():
    """Flat features flattened again keep their C, H, W order, so the dense layer after is still permuted in Keras and Flax."""
    model = models.resolve(ModelSpec("x", (Conv2D(4, 3), Flatten(), Flatten(), Dense(0))), (3, 8, 8), 10)
    assert [r.flattened_from for r in model.layers] == [None, None, (4, 6, 6), (4, 6, 6)]


def test_errors_name_the_layer_the_field_and_the_fix():
    with pytest.raises(SpecError, match=r"^layer 1 \(conv2d conv1\): kernel must be a whole number of at least 1, got 0$"):
        models.validate(ModelSpec("x", (Flatten(), Conv2D(4, 0, name="conv1"))))
    with pytest.raises(SpecError, match=r"^layer 0 \(dense\): unknown activation 9$"):
        models.from_proto(pb.ModelSpec(name="x", layers=[pb.LayerSpec(dense=pb.DenseLayer(activation=9))]))


# -- the registry of layer kinds, and the tables that must cover it ------------------------
def test_an_unknown_kind_is_refused_naming_it_and_the_known_kinds():
    known = ("dense, conv2d, maxpool2d, flatten, batchnorm, dropout, add, avgpool2d, global_avgpool2d, layernorm, tokens, "
             "position_embedding, multihead_attention, token_mean")
    with pytest.raises(SpecError, match=f"^model: layer 1: unknown kind 'concat'; use one of {known}$"):
        models.spec_from_dict({"layers": [{"kind": "flatten"}, {"kind": "concat", "inputs": ["fc1"]}]})
    with pytest.raises(layers.LayerError, match=f"^unknown kind 'LSTM'; use one of {known}$"):
        layers.kind_class("LSTM")
    assert layers.kind_class("Dense") is Dense


def test_every_kind_is_a_layer_spec_in_the_proto_and_round_trips():
    oneof = pb.LayerSpec.DESCRIPTOR.oneofs_by_name["kind"]
    assert [f.name for f in oneof.fields] == list(models.KINDS)
    for kind, cls in models.KINDS.items():
        assert cls.kind == kind and pb.LayerSpec.DESCRIPTOR.fields_by_name[kind].message_type is cls.message.DESCRIPTOR
        layer = cls(name="x")
        assert cls.from_proto(layer.to_proto()) == layer == cls.from_dict({k: v for k, v in layer.to_dict().items() if k != "kind"})
    with pytest.raises(ValueError, match="registered twice"):
        layers.register("dense", "fc", pb.DenseLayer)(Dense)


def _dict_keys(path: str, table: str) -> list[str]:
    """The keys of the dict literal assigned to `table` at the top of a module, read from its source
    (the adapters import their framework, which this process must not)."""
    for node in ast.parse((REPO / path).read_text()).body:
        targets = node.targets if isinstance(node, ast.Assign) else [node.target] if isinstance(node, ast.AnnAssign) else []
        if any(isinstance(t, ast.Name) and t.id == table for t in targets):
            assert isinstance(node.value, ast.Dict), f"{path}: {table} is not a dict literal"
            return [ast.literal_eval(key) for key in node.value.keys]
    raise AssertionError(f"{path} has no table {table}")


@pytest.mark.parametrize("path,table", [
    ("torch_service/adapter.py", "BUILDERS"),
    ("keras_service/adapter.py", "BUILDERS"),
    ("keras_service/adapter.py", "XLA"),
    ("jax_service/adapter.py", "BUILDERS"),
])
def test_every_adapter_table_covers_every_kind(path, table):
    keys = _dict_keys(path, table)
    assert sorted(keys) == sorted(models.KINDS) and len(keys) == len(set(keys)), f"{path} {table}: {keys}"


@pytest.mark.parametrize("table", [layouts.CHANNELS_LAST, keras_layout.LAYOUTS, flax_layout.LAYOUTS], ids=["core", "keras", "flax"])
def test_every_layout_table_covers_every_kind_and_only_kinds_without_tensors_have_none(table):
    assert sorted(table) == sorted(models.KINDS)
    pooled = ModelSpec("pooled", (models.AvgPool2D(2), Flatten(), Dense(0)))
    resolved = [models.resolve(spec, (3, 28, 28), 10) for spec in (models.builtin("cnn-bn"), models.builtin("resnet20"),
                                                                   models.builtin("vit-tiny"), pooled)]
    every = [r for model in resolved for r in model.layers]
    assert {r.kind for r in every} == set(models.KINDS)  # between them, every kind
    for r in every:
        assert (table[r.kind] is layouts.NO_TENSORS) == (not r.params), r.kind


def test_the_layout_modules_import_no_framework():
    code = ("import sys, keras_service.layout, jax_service.layout, weightrelay.layouts, weightrelay.reference\n"
            "print(sorted({'torch', 'tensorflow', 'keras', 'jax', 'flax'} & set(sys.modules)))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=120)
    assert done.returncode == 0 and done.stdout.strip() == "[]", done.stderr[-2000:] + done.stdout
