"""``python -m tail_service``: the same as the ``tail-service`` command."""

from tail_service.cli import main

main()
