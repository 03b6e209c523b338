"""Class labels as people name them: names of labels 0..K-1, a --label given as an index or a class name, and
how a label is written in a picture's title. Standard library only (the CLI and the task modules share it).
"""

from __future__ import annotations

from vaelab.errors import VaelabError


def class_names(classes, k: int) -> list[str]:
    """Names of labels 0..k-1: the data's class names, or the indices themselves."""
    names = [str(c) for c in classes] if classes else []
    return (names + [str(i) for i in range(len(names), k)])[:k]


def class_index(text, k: int, classes, this: str, the: str) -> int:
    """A --label given as an integer in 0..k-1 or a class name (any case), as a class index; `this` and `the`
    name the model or prior in the errors ("this model", "the model")."""
    names = [c.lower() for c in classes or []]
    text = str(text).strip()
    if text.lower() in names:
        return names.index(text.lower())
    try:
        label = int(text)
    except ValueError:
        named = classes and any(c != str(i) for i, c in enumerate(classes))
        known = f" or a class name ({', '.join(classes)})" if named else ""
        raise VaelabError(f"--label {text!r} is not a class of {this}: give an index in 0..{k - 1}"
                          f"{known}") from None
    if not 0 <= label < k:
        raise VaelabError(f"--label {label} is out of range: {the} has {k} classes, labels 0..{k - 1}")
    return label


def label_text(label: int, classes) -> str:
    """'3' for digits, '7: Sneaker' where the class has a name besides its index."""
    name = str(classes[label]) if classes and 0 <= label < len(classes) else str(label)
    return name if name == str(label) else f"{label}: {name}"


__all__ = ["class_names", "class_index", "label_text"]
