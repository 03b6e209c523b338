"""Your own encoder and decoder: any nn.Module pair in place of models/nets.py's networks, recorded so that
the model saves and reloads.

    model = vaelab.build_model("vae", encoder=(MyEncoder, {"width": 64}), decoder=(MyDecoder, {"width": 64}),
                               latent_dim=8, input_shape=(1, 8, 8))

Shapes (B is the batch; k is the model's `encoder_outputs`: 2 for a Gaussian posterior, whose mean and
log-variance are the two halves of dim 1; 1 for the AE):

    encoder: x (B, *input_shape) -> (B, k * latent_dim)
    decoder: z (B, latent_dim)   -> (B, *input_shape), the raw output (logits for a Bernoulli likelihood);
                                    (B, P*C, H, W) / (B, P*D) for a likelihood of P parameters per channel

A conditional model (cvae) concatenates its condition to the networks' inputs as models/nets.py's networks
expect: condition_dim more channels of x (B, C + condition_dim, H, W) or features (B, D + condition_dim), and
z (B, latent_dim + condition_dim). Both networks are checked with one forward pass on a zero batch of 2 when
the model is built. The networks are used as given (no re-initialisation); the latent is flat, (latent_dim,).

Recording (ModelConfig.networks, saved in config.json):
{"encoder": {"class": "pkg.mod:Name", "kwargs": {...}}, "decoder": {...}}. A network is savable when vaelab
knows its class and its constructor's keyword arguments (JSON values), given one of three ways:

  - a (class, kwargs) pair, `encoder=(MyEncoder, {"width": 64})`: vaelab constructs it and records both;
  - an instance of a class decorated with `@recordable` (this module): the arguments it was given;
  - an instance with an `init_kwargs` dict attribute (set by its own __init__): that dict.

Any other nn.Module works in memory; save_pretrained then refuses and says how to make it savable. The class
must be importable by its module path: not defined in __main__ (a script or notebook) or inside a function.

Loading imports the module a config names. Modules inside vaelab are imported freely; importing any other
module runs its code, so loading a config that names one needs the caller's opt-in, trust_code=True
(`--trust-code` in the CLI). Only nn.Module subclasses are ever constructed.
"""

from __future__ import annotations

import functools
import importlib
import inspect
import itertools
import math
import sys

import torch
from torch import nn

from vaelab.config import ModelConfig, networks_problems
from vaelab.errors import CheckpointError, ConfigError
from vaelab.losses import likelihood_of

PARTS = ("encoder", "decoder")
HOW_TO_SAVE = ("to make it savable, pass the class and its keyword arguments, encoder=(MyEncoder, {'width': 64}); "
               "or decorate the class with @vaelab.models.networks.recordable; or set self.init_kwargs = {...} "
               "(JSON values) in its __init__. The class must live in an importable module, not in __main__ or "
               "inside a function")


# ---------------------------------------------------------------------------------------------- recording


def recordable(cls: type) -> type:
    """Class decorator: each instance of `cls` keeps the keyword arguments it was constructed with as
    `init_kwargs`, so that a model built with it saves and reloads. Positional arguments are recorded by their
    parameter names; the arguments not given are left to the class's defaults at load time.

        @recordable
        class MyEncoder(nn.Module):
            def __init__(self, width: int = 64): ...
    """
    if not (isinstance(cls, type) and issubclass(cls, nn.Module)):
        raise TypeError(f"@recordable decorates nn.Module subclasses, not {cls!r}")
    init = cls.__init__
    sig = inspect.signature(init)

    @functools.wraps(init)
    def __init__(self, *args, **kwargs):
        init(self, *args, **kwargs)
        if type(self) is not cls:  # a subclass's constructor: its own decorator (if any) records its arguments
            return
        bound = sig.bind(self, *args, **kwargs)
        recorded = {}
        for name, value in list(bound.arguments.items())[1:]:  # [0] is self
            kind = sig.parameters[name].kind
            if kind is inspect.Parameter.VAR_POSITIONAL:
                if value:
                    return  # *args cannot be passed by keyword: not recordable
            elif kind is inspect.Parameter.POSITIONAL_ONLY:
                return
            elif kind is inspect.Parameter.VAR_KEYWORD:
                recorded.update(value)
            else:
                recorded[name] = value
        self.init_kwargs = recorded

    cls.__init__ = __init__
    return cls


def class_path(cls: type) -> str:
    """"pkg.mod:Qual.Name", how config.json names a class."""
    return f"{cls.__module__}:{cls.__qualname__}"


def _json_value(v, where: str):
    """`v` as plain JSON values (tuples become lists); ConfigError when it holds anything else."""
    if v is None or isinstance(v, (bool, str)):
        return v
    if isinstance(v, int):
        return int(v)
    if isinstance(v, float):
        if not math.isfinite(v):
            raise ConfigError(f"{where}={v!r} is not a finite number")
        return float(v)
    if isinstance(v, (list, tuple)):
        return [_json_value(x, f"{where}[{i}]") for i, x in enumerate(v)]
    if isinstance(v, dict):
        out = {}
        for k, x in v.items():
            if not isinstance(k, str):
                raise ConfigError(f"{where} has the key {k!r}; keys must be strings")
            out[k] = _json_value(x, f"{where}[{k!r}]")
        return out
    raise ConfigError(f"{where}={v!r} is a {type(v).__name__}; constructor arguments must be JSON values "
                      "(numbers, strings, booleans, None, lists and dicts of them)")


def _path_problem(cls: type) -> str | None:
    """Why `cls` cannot be imported back from class_path(cls) (None when it can)."""
    if cls.__module__ == "__main__":
        return f"class {cls.__qualname__} is defined in __main__ (a script or notebook); move it into a module"
    if "<locals>" in cls.__qualname__:
        return f"class {class_path(cls)} is defined inside a function"
    obj = sys.modules.get(cls.__module__)
    for part in cls.__qualname__.split("."):
        obj = getattr(obj, part, None)
    if obj is not cls:
        return f"class {class_path(cls)} is not found under that name in its module"
    return None


def record(module: nn.Module) -> tuple[dict, str | None]:
    """(spec, problem) of a network instance: spec {"class", "kwargs"} with kwargs None when unknown; problem
    says why the network cannot be saved (None when it can)."""
    cls = type(module)
    spec = {"class": class_path(cls), "kwargs": None}
    kwargs = getattr(module, "init_kwargs", None)
    if kwargs is None:
        return spec, (f"{class_path(cls)} records no constructor arguments (no init_kwargs)")
    try:
        if not isinstance(kwargs, dict):
            raise ConfigError(f"init_kwargs={kwargs!r} is a {type(kwargs).__name__}, not a dict")
        spec["kwargs"] = _json_value(kwargs, f"{class_path(cls)}.init_kwargs")
    except ConfigError as e:
        return spec, "; ".join(e.problems)
    return spec, _path_problem(cls)


def save_problems(model) -> list[str]:
    """Why `model` (built with networks of its own) cannot be saved; empty when it can."""
    networks = model.config.networks
    if networks is None:
        return []
    out = []
    for part in PARTS:
        spec, net = networks[part], getattr(model, part)
        if spec["kwargs"] is None:
            problem = record(net)[1] or "its constructor arguments were not recorded when the model was built"
        else:
            problem = _path_problem(type(net)) if class_path(type(net)) == spec["class"] else None
        if problem:
            out.append(f"the {part} {spec['class']} cannot be re-created: {problem}")
    if out:
        out.append(HOW_TO_SAVE)
    return out


# -------------------------------------------------------------------------------------------- building


def check_capable(cls: type, config: ModelConfig) -> None:
    if not cls.custom_networks:
        raise ConfigError(f"model {config.model!r} builds its own networks and takes no encoder= / decoder=; "
                          "networks of your own replace the standard pair of the models that use it (such as vae, "
                          "ae and cvae)", "model configuration")


def from_arguments(cls: type, config: ModelConfig, encoder, decoder) -> tuple[nn.Module, nn.Module, dict]:
    """build_model's encoder= / decoder=: (encoder, decoder, config.networks). Each is an nn.Module instance,
    a (class, kwargs) pair (constructed here from kwargs as JSON values, and recorded), or a class (constructed
    without arguments)."""
    check_capable(cls, config)
    if encoder is None or decoder is None:
        missing = "encoder" if encoder is None else "decoder"
        raise ConfigError(f"{missing}= is missing: networks of your own come in pairs, pass both encoder= and "
                          "decoder=", "model configuration")
    built, specs = [], {}
    for part, value in zip(PARTS, (encoder, decoder)):
        if isinstance(value, nn.Module):
            spec, _ = record(value)  # a network that cannot be recorded still works; save_pretrained says why
            built.append(value)
            specs[part] = spec
            continue
        if isinstance(value, type):
            value = (value, {})
        if not (isinstance(value, tuple) and len(value) == 2 and isinstance(value[0], type)
                and issubclass(value[0], nn.Module) and isinstance(value[1], dict)):
            raise ConfigError(f"{part}={value!r} must be an nn.Module, or a (class, kwargs) pair such as "
                              f"(MyEncoder, {{'width': 64}}) of an nn.Module subclass and a dict",
                              "model configuration")
        net_cls, kwargs = value
        try:
            kwargs = _json_value(kwargs, f"the {part} {class_path(net_cls)}'s kwargs")
        except ConfigError as e:
            raise _model_config_error(e.problems[0]) from None
        built.append(_construct(net_cls, kwargs, part, _model_config_error))
        specs[part] = {"class": class_path(net_cls), "kwargs": kwargs}
    return built[0], built[1], specs


def is_inside_vaelab(class_path_: str) -> bool:
    module = class_path_.partition(":")[0]
    return module == "vaelab" or module.startswith("vaelab.")


def instantiate(networks: dict, trust_code: bool = False, where: str | None = None) -> tuple[nn.Module, nn.Module]:
    """The (encoder, decoder) a config's `networks` names, constructed from their recorded kwargs.

    A class outside vaelab is imported only with trust_code=True: importing a module runs its code. Nothing is
    imported before every check has passed. Errors are CheckpointErrors when `where` (the file) is given."""
    error = CheckpointError if where is not None else _model_config_error
    at = f"{where}: " if where is not None else ""
    problems = networks_problems(networks)
    if problems:
        raise error(f"{at}{'; '.join(problems)}")
    for part in PARTS:
        if networks[part]["kwargs"] is None:
            raise error(f"{at}the {part} {networks[part]['class']} was recorded without its constructor arguments, "
                        "so it cannot be re-created; save the model again with a recordable network")
    outside = [networks[p]["class"] for p in PARTS if not is_inside_vaelab(networks[p]["class"])]
    if outside and not trust_code:
        names = " and ".join(sorted(set(outside)))
        how = ("this config, pass trust_code=True: build_model(config, trust_code=True) (on the command line: "
               "--trust-code)" if where is None else
               "this file, pass trust_code=True: vaelab.from_pretrained(path, trust_code=True), or --trust-code on "
               "the command line")
        raise error(f"{at}the model's networks are classes outside vaelab ({names}); loading them imports their "
                    f"module, which runs its code. If you trust {how}")
    out = []
    for part in PARTS:
        path = networks[part]["class"]
        module_name, _, qual = path.partition(":")
        try:
            obj = importlib.import_module(module_name)
        except Exception as e:
            raise error(f"{at}cannot import module {module_name!r} of the {part} {path}: {type(e).__name__}: {e} "
                        "(is its package installed, or its folder on sys.path / PYTHONPATH?)") from None
        for name in qual.split("."):
            obj = getattr(obj, name, None)
        if not (isinstance(obj, type) and issubclass(obj, nn.Module)):
            raise error(f"{at}the {part} {path} is not an nn.Module subclass of module {module_name!r}")
        out.append(_construct(obj, networks[part]["kwargs"], part, error, at))
    return out[0], out[1]


def _model_config_error(message: str) -> ConfigError:
    return ConfigError(message, "model configuration")


def _construct(cls: type, kwargs: dict, part: str, error: type, at: str = "") -> nn.Module:
    try:
        net = cls(**kwargs)
    except Exception as e:
        raise error(f"{at}constructing the {part} {class_path(cls)}(**{kwargs!r}) failed: {type(e).__name__}: {e}") \
            from None
    if not isinstance(net, nn.Module):
        raise error(f"{at}the {part} {class_path(cls)}(**{kwargs!r}) made a {type(net).__name__}, not an nn.Module")
    return net


def own_networks(cls: type, config: ModelConfig, encoder: nn.Module | None, decoder: nn.Module | None):
    """What Autoencoder.__init__ builds from networks of the user's own: (config with `networks` recorded,
    encoder, decoder, latent_shape), the networks checked by a forward pass on a zero batch of 2.

    Without encoder / decoder, config.networks names them; only classes inside vaelab are imported here
    (build_model and from_pretrained take trust_code and construct the others first)."""
    check_capable(cls, config)
    if encoder is None and decoder is None:
        encoder, decoder = instantiate(config.networks)
    elif not (isinstance(encoder, nn.Module) and isinstance(decoder, nn.Module)):
        raise ConfigError(f"encoder= and decoder= must both be nn.Module instances here, got "
                          f"{type(encoder).__name__} and {type(decoder).__name__} (build_model also takes "
                          "(class, kwargs) pairs)", "model configuration")
    elif config.networks is None:
        config = config.replace(networks={part: record(net)[0] for part, net in zip(PARTS, (encoder, decoder))})
    for part, net, (shape_in, shape_out, what) in zip(PARTS, (encoder, decoder), expected_shapes(cls, config)):
        _dry_run(part, net, shape_in, shape_out, what, config)
    return config, encoder, decoder, (config.latent_dim,)


def expected_shapes(cls: type, config: ModelConfig) -> list[tuple[tuple, tuple, str]]:
    """[(input shape, output shape, what the output is)] per sample, of the encoder and the decoder."""
    shape, c, k, d = tuple(config.input_shape), config.condition_dim, cls.encoder_outputs, config.latent_dim
    x_in = (shape[0] + c, *shape[1:])  # a condition enters as extra channels (images) or features (vectors)
    cond = f"; its input is x with {c} condition {'channels' if len(shape) == 3 else 'features'}" if c else ""
    head = (f"{k} x latent_dim {d}: the mean and log-variance halves" if k == 2 else
            f"latent_dim {d}" if k == 1 else f"{k} x latent_dim {d}")
    likelihood = likelihood_of(config)
    raw = likelihood.raw_shape(shape)
    what = ("input_shape, the decoder's raw output" if raw == shape else
            f"the decoder's raw output: {likelihood.params_per_channel} values per channel of input_shape "
            f"{shape} for likelihood {config.likelihood!r}")
    return [(x_in, (k * d,), f"{head}{cond}"),
            ((d + c,), raw, what + (f"; its input is z with {c} condition features" if c else ""))]


def _dry_run(part: str, net: nn.Module, shape_in: tuple, shape_out: tuple, what: str, config: ModelConfig) -> None:
    first = next(itertools.chain(net.parameters(), net.buffers()), None)
    device = first.device if first is not None else torch.device("cpu")
    dtype = first.dtype if first is not None and first.is_floating_point() else torch.get_default_dtype()
    x = torch.zeros((2, *shape_in), dtype=dtype, device=device)
    name = f"the {part} {class_path(type(net))}"
    expected = (2, *shape_out)
    modes = [(m, m.training) for m in net.modules()]
    net.eval()  # no batch-norm statistics updated, no dropout
    try:
        devices = [device] if device.type == "cuda" else []
        with torch.no_grad(), torch.random.fork_rng(devices=devices):  # the dry pass draws no one's randomness
            out = net(x)
    except Exception as e:
        raise ConfigError(f"{name} failed on a zero batch of shape {tuple(x.shape)}: {type(e).__name__}: {e}; "
                          f"model {config.model!r} expects it to return shape {expected} ({what})",
                          "model configuration") from None
    finally:
        for m, mode in modes:
            m.training = mode
    if not isinstance(out, torch.Tensor):
        raise ConfigError(f"{name} returned a {type(out).__name__} for a zero batch of shape {tuple(x.shape)}; "
                          f"model {config.model!r} expects a tensor of shape {expected} ({what})",
                          "model configuration")
    got = tuple(out.shape)
    if got != expected:
        raise ConfigError(f"{name} returned shape {got} for a zero batch of shape {tuple(x.shape)}; model "
                          f"{config.model!r} expects shape {expected} ({what})", "model configuration")
