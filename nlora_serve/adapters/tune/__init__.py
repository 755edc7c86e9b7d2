"""``nlora-serve adapters tune``: train an IntTune tenant, i.e. only its r×r matrix N.

A = W[:r, :] and B = W[:, :r] stay frozen views of the base weight (DESIGN §1); what a tenant
trains and ships is N alone.

Modules::

    train.py          the training loop: NLoRA init, N attached to every targeted linear, AdamW
    data.py           chat examples from JSONL -> (input ids, labels), loss on assistant turns only
    unlikelihood.py   token-level unlikelihood against a fixed set of negative tokens (optional)
    cli.py            the ``adapters tune`` command
"""
