"""Position policies: which positions of a site's activation a steering context changes.

Two families:

* **token policies** (``"prompt"``, ``"generated"``, ``"continuation"``, ``"from:k"``, and the
  windows ``"prompt:a:b"`` and ``"generated:a:b"``) follow the text being processed: they depend on the KV cache, the padding and the ``generate`` call, which the
  context tracks (:class:`tdsteer.positions.PositionTracker`); they apply to token sequences
  (``NLC`` sites) only.
* **site policies** (``"patches"``, ``"prefix"``) depend on the site alone: its ``prefix_tokens``
  (class and register tokens of a vision transformer) and its layout. Each site gets its own static
  mask; no tracking is involved.

``"all"`` (the default) steers every position of every site.

What a hook gets for a policy is a :data:`Selection`: a mask tensor, or a :class:`Span` when the
whole call is selected (:attr:`Span.ALL`) or none of it is (:attr:`Span.NONE`) and no mask is needed.
"""

from __future__ import annotations

import enum
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TypeAlias

import torch
from torch import Tensor

PositionsLike = str | int


class Span(enum.Enum):
    """A selection that covers every position of the current call, or none of them.

    Hooks tell the members apart by identity (``selected is Span.NONE``), which costs no
    allocation and reads no device tensor.
    """

    ALL = "all"
    """Every position is selected: steer the whole call, no mask needed."""
    NONE = "none"
    """No position is selected: leave the activation as it is."""


Selection: TypeAlias = Tensor | Span
"""What a policy selects in one call: a mask tensor, or a :class:`Span` when the answer is the same
for every position."""

WINDOW_KINDS = ("prompt_window", "generated_window")
TOKEN_KINDS = ("prompt", "generated", "continuation", "from", *WINDOW_KINDS)
SITE_KINDS = ("patches", "prefix")


@dataclass(frozen=True)
class PositionPolicy:
    """Where steering applies along the token axis.

    Args:
        kind: ``"all"``; the token policies ``"prompt"`` (tokens of the prompt given to ``generate``;
            every token of a plain forward call), ``"generated"`` (tokens produced by ``generate``;
            none in a plain forward call), ``"continuation"`` (the positions whose outputs score a
            continuation: from each row's start on, the starts set per call with
            :meth:`~tdsteer.positions.PositionTracker.set_starts`; without starts, inside
            ``generate`` the last prompt token and the generated tokens, and nothing in a plain
            forward call) or ``"from"`` (tokens from real position ``start`` on, counted from each
            row's first non-padding token), ``"prompt_window"`` (``"prompt:a:b"``: the prompt tokens
            ``a`` to ``b - 1`` of each row, a Python slice of the row's real prompt tokens; a negative
            bound counts from the end of the row's prompt; in a plain forward call the prompt is the
            sequence up to the call's last token) or ``"generated_window"`` (``"generated:a:b"``: the
            generated tokens ``a`` to ``b - 1``, counted from the first generated token; none in a
            plain forward call); or the site policies ``"patches"`` (token positions
            ``>=`` each site's ``prefix_tokens``, every position of a feature map) and ``"prefix"``
            (token positions ``<`` each site's ``prefix_tokens``; nothing on a site without prefix
            tokens or on a feature map).
        start: First real position for ``kind="from"``; first index of a window (negative: from the
            end of each row's prompt, for ``"prompt_window"``).
        stop: End (excluded) of a window; ``None`` for the end of the prompt or of the generation.

    Examples:
        >>> PositionPolicy("from", 2).tracked
        True
        >>> PositionPolicy("patches").tracked, PositionPolicy("patches").per_site
        (False, True)
    """

    kind: str
    start: int = 0
    stop: int | None = None

    @property
    def spec(self) -> str:
        """The policy as ``positions=`` writes it: ``"from:2"``, ``"prompt:-1:"``, ``"generated:0:8"``.

        Examples:
            >>> as_policy("prompt:-1:").spec, as_policy(3).spec, as_policy("all").spec
            ('prompt:-1:', 'from:3', 'all')
        """
        if self.kind == "from":
            return f"from:{self.start}"
        if self.kind in WINDOW_KINDS:
            stop = "" if self.stop is None else self.stop
            return f"{self.kind.removesuffix('_window')}:{self.start}:{stop}"
        return self.kind

    @property
    def is_all(self) -> bool:
        """Whether every position is selected, so that no position needs tracking."""
        return self.kind == "all" or (self.kind == "from" and self.start == 0)

    @property
    def per_row(self) -> bool:
        """Whether the policy reads per-row starts (:meth:`PositionTracker.set_starts`)."""
        return self.kind == "continuation"

    @property
    def per_site(self) -> bool:
        """Whether the policy is a static per-site mask (``"patches"``, ``"prefix"``)."""
        return self.kind in SITE_KINDS

    @property
    def tracked(self) -> bool:
        """Whether the policy needs the position tracker (a root hook and a ``generate`` wrapper)."""
        return self.kind in TOKEN_KINDS and not self.is_all

    @property
    def tokens_only(self) -> bool:
        """Whether the policy selects token positions, which feature maps do not have."""
        return self.kind in TOKEN_KINDS and not self.is_all


_FROM = re.compile(r"^from[:_ ]?(\d+)$")
_WINDOW = re.compile(r"^(prompt|generated):(-?\d+)?:(-?\d+)?$")
_NAMED = ("all", "prompt", "generated", "continuation", "patches", "prefix")
#: The text policies, as the command line and the evaluation package list them.
POSITION_POLICIES = (
    "all",
    "prompt",
    "generated",
    "continuation",
    "prompt:A:B (a slice of each row's real prompt tokens, e.g. prompt:-1: for the last)",
    "generated:A:B (generated tokens A to B-1, e.g. generated:0:8)",
    "from:K (or an int K)",
)
#: The policies of image models (per-site masks from each site's ``prefix_tokens``).
IMAGE_POLICIES = ("patches", "prefix")


def as_policy(positions: PositionsLike | PositionPolicy) -> PositionPolicy:
    """Parse a position policy: ``"all"``, ``"prompt"``, ``"generated"``, ``"continuation"``, an int
    ``k`` or ``"from:k"``, a window ``"prompt:a:b"`` or ``"generated:a:b"`` (either bound may be
    left out, as in a Python slice), ``"patches"`` or ``"prefix"``.

    Args:
        positions: The policy, by name or as a :class:`PositionPolicy`.

    Returns:
        The :class:`PositionPolicy`.

    Raises:
        TypeError: A bool.
        ValueError: An unknown name, a negative start or an empty or negative window; the message
            lists the accepted forms.

    Examples:
        >>> as_policy(3)
        PositionPolicy(kind='from', start=3, stop=None)
        >>> as_policy("generated").kind
        'generated'
        >>> as_policy("continuation").per_row
        True
        >>> as_policy("patches").per_site
        True
        >>> as_policy("generated:0:8")
        PositionPolicy(kind='generated_window', start=0, stop=8)
        >>> as_policy("prompt:-1:")
        PositionPolicy(kind='prompt_window', start=-1, stop=None)
    """
    policy = _parse(positions)
    if policy is None:
        every = ", ".join((*POSITION_POLICIES[:-1], *IMAGE_POLICIES, POSITION_POLICIES[-1]))
        raise ValueError(f"Unknown position policy {positions!r}; use one of {every}")
    return policy


def as_token_policy(positions: PositionsLike | PositionPolicy, extra: Sequence[str] = ()) -> PositionPolicy:
    """Parse the position policy of a language model: ``"all"`` or a token policy. The image policies
    (``"patches"``, ``"prefix"``: per-site masks from a vision transformer's prefix tokens) select
    nothing meaningful in a token sequence and are refused, before any model runs.

    Args:
        positions: The policy, by name or as a :class:`PositionPolicy`.
        extra: Names of policies the caller accepts besides the core's (``"assistant"`` in
            ``tdsteer_eval``), listed in the error message; the caller handles them before this call.

    Returns:
        The :class:`PositionPolicy`.

    Raises:
        TypeError: A bool.
        ValueError: An image policy, an unknown name, a negative start or an empty or negative
            window; the message lists the token policies to use instead.

    Examples:
        >>> as_token_policy("from:2")
        PositionPolicy(kind='from', start=2, stop=None)
        >>> as_token_policy("patches")
        Traceback (most recent call last):
        ...
        ValueError: positions='patches' is a policy of image models (it selects positions from each site's prefix tokens) and means nothing for a language model; use one of all, prompt, generated, continuation, prompt:A:B (a slice of each row's real prompt tokens, e.g. prompt:-1: for the last), generated:A:B (generated tokens A to B-1, e.g. generated:0:8), from:K (or an int K)
    """
    names = ", ".join((*POSITION_POLICIES[:-1], *extra, POSITION_POLICIES[-1]))
    policy = _parse(positions)
    if policy is None:
        raise ValueError(f"Unknown position policy {positions!r}; use one of {names}")
    if policy.per_site:
        raise ValueError(
            f"positions={policy.kind!r} is a policy of image models (it selects positions from each site's "
            f"prefix tokens) and means nothing for a language model; use one of {names}"
        )
    return policy


def _parse(positions: PositionsLike | PositionPolicy) -> PositionPolicy | None:
    """The policy named by ``positions``, or ``None`` for an unknown name.

    Raises:
        TypeError: A bool.
        ValueError: A negative start.
    """
    if isinstance(positions, PositionPolicy):
        return positions
    if isinstance(positions, bool):
        raise TypeError("positions must be a policy name or an int, got a bool")
    if isinstance(positions, int):
        if positions < 0:
            raise ValueError(f"positions={positions}: a start position must be >= 0")
        return PositionPolicy("from", positions)
    if isinstance(positions, str):
        if positions in _NAMED:
            return PositionPolicy(positions)
        match = _FROM.match(positions)
        if match:
            return PositionPolicy("from", int(match.group(1)))
        match = _WINDOW.match(positions)
        if match:
            return _window(positions, match.group(1), match.group(2), match.group(3))
    return None


def _window(spec: str, kind: str, first: str | None, end: str | None) -> PositionPolicy:
    """The window policy of ``spec`` (``"prompt:a:b"``, ``"generated:a:b"``), checked.

    Raises:
        ValueError: A generated window with a negative bound (how many tokens ``generate`` makes is
            not known in advance), or a window that is empty whatever the prompt's length.
    """
    start = 0 if first is None else int(first)
    stop = None if end is None else int(end)
    forms = ", ".join(POSITION_POLICIES)
    if kind == "generated" and (start < 0 or (stop is not None and stop < 0)):
        raise ValueError(
            f"positions={spec!r}: a generated window counts from the first generated token, so its bounds "
            f"must be >= 0 (write generated:A:B with 0 <= A < B, or generated:A: for every token from A on); "
            f"accepted forms: {forms}"
        )
    if stop is not None and (start < 0) == (stop < 0) and stop <= start:
        raise ValueError(
            f"positions={spec!r} selects no token (a window A:B selects A to B-1, so B must be greater than A); "
            f"accepted forms: {forms}"
        )
    return PositionPolicy(f"{kind}_window", start, stop)


def site_mask(policy: PositionPolicy, prefix_tokens: int, tokens: bool, length: int, device: torch.device) -> Selection:
    """The static mask of a per-site policy (``"patches"``, ``"prefix"``) at one site.

    Args:
        policy: The policy.
        prefix_tokens: The site's leading class / register tokens.
        tokens: Whether the site is a token sequence (``NLC``); a feature map has no prefix tokens.
        length: Number of positions of the activation.
        device: Where to build a mask.

    Returns:
        :attr:`Span.ALL`, :attr:`Span.NONE`, or a bool tensor ``[1, L]``.

    Examples:
        >>> site_mask(as_policy("patches"), 1, True, 4, torch.device("cpu"))
        tensor([[False,  True,  True,  True]])
        >>> site_mask(as_policy("prefix"), 0, True, 4, torch.device("cpu"))
        <Span.NONE: 'none'>
        >>> site_mask(as_policy("patches"), 0, False, 4, torch.device("cpu"))  # a feature map
        <Span.ALL: 'all'>
    """
    patches = policy.kind == "patches"
    prefix = prefix_tokens if tokens else 0
    if prefix <= 0:
        return Span.ALL if patches else Span.NONE
    if prefix >= length:
        return Span.NONE if patches else Span.ALL
    pos = torch.arange(length, device=device).unsqueeze(0)
    return pos >= prefix if patches else pos < prefix
