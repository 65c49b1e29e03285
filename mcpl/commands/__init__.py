"""Sub-commands of the `mcpl` CLI; each module exposes `register(subparsers)`."""
