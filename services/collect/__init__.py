"""``ssjf collect``: label a prompt set with the served LLM's own answers, through the stack."""
