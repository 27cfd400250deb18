"""The end of a call: the last layer's output scattered back to full length, the selection kept.

The forward hook of the last decoder layer puts the pruned layers' hidden states back at their
full positions (the dropped tokens keep what the unpruned layers gave them), so the final norm,
the head and anything after see the input's length. The call's end records what was kept for
``last_selection`` and closes the call.
"""

from __future__ import annotations

from typing import Any

import torch

from ..select.saliency import PROBING
from .first_stage import FirstStage
from .plan import scatter_back


class CallEnd(FirstStage):
    """The runtime's step that scatters back and ends a call (see the module's docstring)."""

    def _last_layer_end(
        self, module: torch.nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], output: Any
    ) -> Any:
        if PROBING.get():
            return None
        call = self._call.get()
        if call is None or not call.pruned or call.base_hidden is None:
            return None
        final = call.stages[len(self.stages) - 1]
        assert final is not None and final.full_index is not None
        out = output[0] if isinstance(output, tuple) else output
        full = scatter_back(call.base_hidden, out, final.full_index, no_filler=final.all_valid)
        return (full, *output[1:]) if isinstance(output, tuple) else full

    def _call_end(
        self, module: torch.nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], output: Any
    ) -> None:
        call = self._call.get()
        if call is None:
            return
        self._call.reset(self._tokens.pop(id(call)))
        if call.record is not None and not call.pruned:
            call.record.full_len += call.q_len
        if call.pruned:
            assert call.visual is not None
            stages = [call.stages[s] for s in range(len(self.stages))]
            self._last = (call.visual, [st.full_index for st in stages if st is not None])
        elif call.visual is not None:
            self._last = (call.visual, [None] * len(self.stages))
