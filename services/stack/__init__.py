"""Running the whole SSJF stack on one machine: ``ssjf up`` and the ``ssjf generate`` client."""
