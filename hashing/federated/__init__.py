"""What both sides of the wire share, Flower-free: the message protocol (:mod:`.protocol`) and the
exact pooling of the silos' statistics (:mod:`.pooling`). ``client/`` and ``server/`` import this;
the core of ``hashing/`` never does."""
