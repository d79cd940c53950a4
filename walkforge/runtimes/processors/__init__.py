"""Processors: raw robot observations → walk inputs, walk outputs → robot actions (numpy only).

LeRobot's pre/post-processing of pi0 and pi0.5, step by step (docs/model_facts.md,
"LeRobot policy folders and processing"), read from the bundle's "policy" manifest entry and its files:

    images.py     uint8/float, HWC/CHW, any size → float [0, 1] CHW, resized with black padding
    state.py      MEAN_STD / MIN_MAX / QUANTILES / IDENTITY, zero padding, pi0.5's state bins
    prompts.py    pi0's and pi0.5's prompt text, BOS + right-padded token ids (too long: refused)
    tokenizer.py  the bundled tokenizer (tokenizer.json or SentencePiece tokenizer.model)
    policy.py     PolicyProcessor: a whole observation in, a whole action chunk out
"""

from walkforge.runtimes.processors.policy import PolicyProcessor, stack_feeds

__all__ = ["PolicyProcessor", "stack_feeds"]
