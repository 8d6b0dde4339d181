"""export-peft's plan: which module of the base model gets which treatment in the adapter (a LoRA
of the stored factors, an exact full-rank LoRA, trainable tokens, the whole module in
``modules_to_save``, a bias, nothing), worked out from the artifact's manifest and the model's
structure on the meta device.
peft_adapter.py's docstring says why each kind of change is carried the way it is.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from inrank_convert.artifact import Artifact
from inrank_convert.core.errors import UsageError
from inrank_convert.model.architecture import checkpoint_keys, conv1d_class, meta_model
from inrank_convert.runtime.modeling import check_fits_config, model_config

PEFT_PREFIX = "base_model.model."  # what PeftModel.save_pretrained puts before every module name


@dataclass
class LoraTarget:
    """One LoRA module: ``module`` gets ``delta = B @ A`` on its weight (stored orientation)."""

    module: str
    source: str  # the artifact tensor the update comes from
    layout: str  # "linear" (weight [out, in]), "conv1d" (weight [in, out]) or "embedding" ([num, dim])
    shape: tuple[int, int]  # of the weight as stored
    rank: int
    full_rank: bool = False  # a dense-stored update written as delta @ I
    placeholder: bool = False  # a zero update: PEFT refuses an adapter without any LoRA module
    truncated_from: int | None = None  # export-peft --target vllm: the update's rank, cut to ``rank`` by an SVD


@dataclass
class TokenRows:
    """The rows of an input embedding that differ from the base, carried as PEFT trainable tokens
    (``trainable_token_indices``: PEFT replaces those rows with the values saved; a tied head follows)."""

    module: str
    source: str  # the artifact tensor (lowrank+rows)
    indices: list[int]  # every row whose value differs from the reference's, ascending
    values: torch.Tensor  # [len(indices), dim] those rows as rebuilt, the tensor's dtype: what PEFT saves

    @property
    def bytes(self) -> int:
        return self.values.numel() * self.values.element_size()


@dataclass
class CarriedInFull:
    """An artifact tensor the adapter carries whole (no row-sparse LoRA in PEFT)."""

    name: str  # the artifact tensor
    modules: list[str]  # the modules that carry it (two for a tied embedding)
    how: str  # "full_rank_lora" (delta @ I) or "modules_to_save" (the trained module itself)
    why: str
    bytes: int  # what it adds to adapter_model.safetensors, over all its modules

    def to_json(self) -> dict:
        return {"name": self.name, "modules": self.modules, "how": self.how, "why": self.why, "bytes": self.bytes}


# ----------------------------------------------------------------------------------------------
# The model's structure


def adapter_model_structure(artifact: Artifact):
    """The transformers model of ``config.json`` on the meta device: module types and names only."""
    config = model_config(artifact.path)  # refuses a missing or unreadable config.json
    file = artifact.path / "config.json"
    try:
        model = meta_model(config)
    except (ValueError, KeyError, OSError) as err:
        raise UsageError(f"cannot build a causal language model from config.json ({err})", str(file),
                         "export-peft supports Hugging Face causal LMs; use 'inrank-convert decompress' otherwise") from err
    # Every artifact tensor must have its place in that model, and the model all it needs: the plan
    # below would silently skip a tensor that has none.
    check_fits_config(artifact, model)
    return model


def _layout(module: torch.nn.Module) -> str | None:
    """How PEFT's LoRA wraps this module, by the orientation of its stored weight; None: it cannot."""
    if isinstance(module, conv1d_class()):
        return "conv1d"
    if isinstance(module, torch.nn.Embedding):
        # PEFT's LoRA embedding looks up its input ids in lora_embedding_A: right only for a plain lookup.
        # A subclass with its own forward maps its input otherwise (OPT's learned positions take the
        # attention mask and add an offset of 2; Gemma 3's scaled embedding multiplies the rows): such a
        # module goes whole to modules_to_save.
        return "embedding" if type(module).forward is torch.nn.Embedding.forward else None
    if isinstance(module, torch.nn.Linear):
        return "linear"
    return None


# ----------------------------------------------------------------------------------------------
# The plan: which module gets which treatment


@dataclass
class AdapterPlan:
    targets: list[LoraTarget]
    modules_to_save: list[str]
    module_keys: dict[str, dict[str, str]]  # module -> {state-dict key of the module: artifact tensor}
    biases: dict[str, str]  # adapter key -> artifact tensor
    unchanged: list[str]
    notes: list[str]
    carried_in_full: list[CarriedInFull] = field(default_factory=list)
    resize_token_embeddings: int | None = None
    trainable_tokens: list[TokenRows] = field(default_factory=list)


def plan_adapter(artifact: Artifact, model, tokens: bool = False) -> AdapterPlan:
    """The exact adapter. ``tokens``: a lowrank+rows input embedding goes in as PEFT's trainable
    tokens (the rows that differ from the base, a tied head following them) rather than as a
    full-rank LoRA: exact too, and smaller (``_rows_as_tokens``). Servers that read no trainable
    tokens (vLLM, llama.cpp) take the LoRA form."""
    tensors = artifact.tensors
    reference = artifact.reference
    known = set(reference.infos() or {})  # an embedded init holds only factorized and zero tensors
    state = model.state_dict(keep_vars=True)
    modules = dict(model.named_modules())

    # Every state-dict key of the model -> the artifact tensor that holds its value. A key missing from
    # the artifact may be tied to one that is there (GPT-2's lm_head.weight: Hugging Face drops it on save).
    # The artifact keeps its source's saved names, which transformers maps to keys on load (GPT-NeoX:
    # embed_out.weight -> lm_head.weight); the adapter addresses modules by their keys.
    places = checkpoint_keys(model, tensors)
    saved = {key: name for name, key in places.items() if key is not None}
    shared: dict[int, list[str]] = {}
    for key, tensor in state.items():
        shared.setdefault(id(tensor), []).append(key)
    source: dict[str, str] = {}
    for key, tensor in state.items():
        found = next((saved[name] for name in (key, *shared[id(tensor)]) if name in saved), None)
        if found is not None:
            source[key] = artifact.canonical(found)

    def changed(name: str) -> bool:
        entry = tensors[name]
        if entry.kind == "zero":
            return False
        if entry.has_factors or name not in known or entry.reference_rows is not None:
            return True
        stored, ref = artifact.stored(name), reference.get(name)
        return not (stored.dtype == ref.dtype and torch.equal(stored, ref))

    targets: dict[str, LoraTarget] = {}
    to_save: set[str] = set()
    biases: dict[str, str] = {}  # model key -> artifact tensor
    unchanged: list[str] = []
    for key, name in source.items():
        module_name, _, attribute = key.rpartition(".")
        entry = tensors[name]
        layout = _layout(modules[module_name])
        if attribute == "weight" and layout is not None and len(entry.shape) == 2:
            shape = entry.shape
            if entry.reference_rows is not None:
                # A grown vocabulary: the base model's module has fewer rows than this one, and the rows a
                # resized base adds are not the reference's (they are new, initialized by transformers), so
                # no update applies to them: the adapter carries the whole trained module.
                to_save.add(module_name)
            elif entry.kind == "lowrank":
                targets[module_name] = LoraTarget(module_name, name, layout, shape, int(entry.rank or 0))
            elif entry.kind in ("dense", "lowrank+rows") and name not in known:
                # The update of this matrix is unknown (an embedded init does not hold the reference of a
                # dense-stored tensor), so the adapter carries the whole trained module instead.
                to_save.add(module_name)
            elif changed(name):
                # A dense-stored or lowrank+rows matrix: its whole update as an exact full-rank LoRA.
                targets[module_name] = LoraTarget(module_name, name, layout, shape, min(shape), full_rank=True)
            else:
                unchanged.append(module_name)
        elif not changed(name):
            continue
        elif attribute == "bias":
            biases[key] = name
        else:
            to_save.add(module_name)

    used = set(source.values())
    for name, entry in tensors.items():
        if not entry.is_alias and name not in used and changed(name):
            what = ("is one transformers fuses or splits with others on load (no module holds it alone)"
                    if places[name] is None else f"is no parameter of {type(model).__name__} built from config.json")
            raise UsageError(f"tensor {name!r} changed but {what}, so a PEFT adapter cannot carry it",
                             str(artifact.path), "use 'inrank-convert decompress' for the dense model")

    token_rows = _rows_as_tokens(artifact, model, targets) if tokens else []

    module_keys: dict[str, dict[str, str]] = {}
    for module_name in sorted(to_save):
        module = modules[module_name]
        if not module_name or any(True for child in module.children() for _ in child.parameters()):
            raise UsageError(f"the changed tensors of module {module_name or '(the model itself)'!r} cannot go into "
                             "a PEFT adapter (only leaf modules can be saved whole)", str(artifact.path),
                             "use 'inrank-convert decompress' for the dense model")
        keys = {}
        for attribute in module.state_dict():
            key = f"{module_name}.{attribute}"
            if key not in source:
                raise UsageError(f"module {module_name!r} changed but the artifact lacks its tensor {key!r}",
                                 str(artifact.path), "use 'inrank-convert decompress' for the dense model")
            keys[attribute] = source[key]
        module_keys[module_name] = keys
        targets.pop(module_name, None)  # the whole copy carries the weight too

    notes = [f"{item.source} is lowrank+rows: {item.module} carries the {len(item.indices)} rows that differ from "
             f"the base as PEFT trainable tokens (trainable_token_indices, {_size(item.bytes)})" for item in token_rows]
    if not targets:
        # PEFT refuses an adapter that puts LoRA on no module; a rank-1 zero update changes nothing.
        host = next((name for name, module in modules.items() if _layout(module) in ("linear", "conv1d")
                     and name not in to_save and len(shared[id(module.weight)]) == 1), None)
        if host is None:
            raise UsageError("no matrix changed and the model has no Linear/Conv1D module to anchor an adapter",
                             str(artifact.path), "use 'inrank-convert decompress' for the dense model")
        shape = tuple(modules[host].weight.shape)
        targets[host] = LoraTarget(host, "", _layout(modules[host]), shape, 1, placeholder=True)
        notes.append(f"no matrix changed; {host} carries a rank-1 zero LoRA because PEFT needs one LoRA module")
    for keys in shared.values():
        tied_targets = [key for key in keys if key.endswith(".weight") and key.removesuffix(".weight") in targets]
        if len(tied_targets) > 1:
            notes.append(f"{' and '.join(tied_targets)} share one tensor in the base model: each module carries the "
                         "update, so the adapter is exact, but PeftModel.merge_and_unload() would add it twice; "
                         "use 'inrank-convert decompress' for a merged dense model")

    bias_keys = {}
    for key, name in biases.items():
        module_name, _, attribute = key.rpartition(".")
        if module_name in to_save:
            continue  # in the module's copy
        inner = f"{module_name}.base_layer" if module_name in targets else module_name
        bias_keys[f"{PEFT_PREFIX}{inner}.{attribute}"] = name

    if all(target.placeholder for target in targets.values()) and not module_keys and not bias_keys and not token_rows:
        raise UsageError("the artifact holds no change over its reference, so there is no adapter to write",
                         str(artifact.path), "the reference model itself is the compressed model")
    ordered = [targets[name] for name in modules if name in targets]
    _check_names_unambiguous([target.module for target in ordered], sorted(module_keys), list(modules))
    carried = _carried_in_full(tensors, ordered, module_keys)
    notes.extend(item.why for item in carried)
    # resize_token_embeddings resizes the input embedding and an untied output head together.
    grown = [tensors[item.name].shape[0] for item in carried if tensors[item.name].reference_rows is not None]
    resize = max(grown) if grown else None
    return AdapterPlan(ordered, sorted(module_keys), module_keys, bias_keys, unchanged, notes, carried, resize,
                       token_rows)


def _rows_as_tokens(artifact: Artifact, model, targets: dict[str, LoraTarget]) -> list[TokenRows]:
    """Take a lowrank+rows input embedding out of ``targets`` as trainable tokens: every row whose
    rebuilt value differs from the reference's, so the rows left alone are exactly the base's.

    PEFT (0.21) wraps an embedding either in LoRA or in trainable tokens, not both, and replaces
    whole rows; so the rows are saved with their values (W_ref + B @ A + rows), and a row the
    low-rank part moves is one of them. Only the input embedding, and with a head that shares its
    tensor only where the config ties them (PEFT then makes the head read the same rows)."""
    embedding = model.get_input_embeddings()
    name = next((module for module, target in targets.items() if target.layout == "embedding"
                 and model.get_submodule(module) is embedding), None)
    if name is None or artifact.tensors[targets[name].source].kind != "lowrank+rows":
        return []
    source = targets[name].source
    sharing = [module for module, target in targets.items() if target.source == source and module != name]
    output = model.get_output_embeddings()
    tied = getattr(model.config.get_text_config(), "tie_word_embeddings", False)
    if sharing and not (tied and len(sharing) == 1 and model.get_submodule(sharing[0]) is output):
        return []
    weight = artifact.reconstruct(source)
    differs = (weight != artifact.reference.get(source).to(weight.dtype)).any(dim=1)  # [rows]
    for module in (name, *sharing):
        del targets[module]
    indices = torch.nonzero(differs).flatten()
    return [TokenRows(name, source, indices.tolist(), weight[indices])] if len(indices) else []


def _carried_in_full(tensors: dict, targets: list[LoraTarget], module_keys: dict[str, dict[str, str]]
                     ) -> list[CarriedInFull]:
    """The tensors the adapter carries whole although the artifact stores them compactly: every
    lowrank+rows tensor (PEFT has no row-sparse LoRA), every tensor of a grown vocabulary, and a
    low-rank weight of a module PEFT's LoRA cannot wrap (OPT's learned position embedding)."""
    found: dict[str, CarriedInFull] = {}

    def add(name: str, module: str, how: str, nbytes: int) -> None:
        item = found.setdefault(name, CarriedInFull(name, [], how, "", 0))
        item.modules.append(module)
        item.bytes += nbytes

    for target in targets:
        if target.full_rank and tensors[target.source].kind == "lowrank+rows":
            rows, cols = target.shape
            add(target.source, target.module, "full_rank_lora", 4 * target.rank * (rows + cols))  # float32 factors
    for module, keys in module_keys.items():
        for name in keys.values():
            entry = tensors[name]
            if entry.has_factors or entry.reference_rows is not None:
                add(name, module, "modules_to_save", math.prod(entry.shape) * entry.dtype.itemsize)
    for name, item in found.items():
        entry = tensors[name]
        where = " and ".join(item.modules)
        form = (f"lowrank+rows (rank {entry.rank or 0} + {entry.rows} rows)" if entry.kind == "lowrank+rows"
                else entry.kind)
        old_rows = entry.reference_rows
        if old_rows is not None:
            item.why = (f"{name} has {entry.shape[0]} rows and its reference {old_rows} (a grown vocabulary, stored "
                        f"{form}): {where} saved whole (modules_to_save, {_size(item.bytes)}); resize the base "
                        f"model first: base.resize_token_embeddings({entry.shape[0]})")
        elif item.how == "full_rank_lora":
            item.why = (f"{name} is {form}, and PEFT has no row-sparse LoRA: {where} carry its whole update as an "
                        f"exact full-rank LoRA (delta @ I, {_size(item.bytes)})")
        elif entry.kind == "lowrank":
            item.why = (f"{name} is lowrank (rank {entry.rank or 0}), but PEFT's LoRA would change what {where} "
                        f"computes (its forward is not a plain Linear/Embedding one): saved whole "
                        f"(modules_to_save, {_size(item.bytes)})")
        else:
            item.why = (f"{name} is {form} and its reference is not known: {where} saved whole "
                        f"(modules_to_save, {_size(item.bytes)})")
    return [found[name] for name in tensors if name in found]


def _size(count: float) -> str:
    """Bytes as notes say them (the library does not import the console's formatter)."""
    if count < 1024:
        return f"{int(count)} B"
    for unit in ("KB", "MB", "GB"):
        count /= 1024
        if count < 1024 or unit == "GB":
            break
    return f"{count:.1f} {unit}"


def _check_names_unambiguous(targets: list[str], to_save: list[str], names: list[str]) -> None:
    """PEFT matches ``target_modules`` by name or ``.``-suffix and ``modules_to_save`` by plain suffix."""
    target_set = set(targets)
    for name in names:
        if name not in target_set and any(name.endswith("." + target) for target in targets):
            raise UsageError(f"PEFT would also put LoRA on module {name!r}, whose name ends like a target's",
                             name, "use 'inrank-convert decompress' for the dense model")
        if name not in to_save and any(name.endswith(module) for module in to_save):
            raise UsageError(f"PEFT would also save module {name!r}, whose name ends like a saved module's",
                             name, "use 'inrank-convert decompress' for the dense model")
