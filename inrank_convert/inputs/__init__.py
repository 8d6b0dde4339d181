"""What a command is given, made ready: any checkpoint form (an artifact and a run folder included)
with the reference its update is measured against (``sources``, ``reference``), and text turned
into token ids (``text``)."""
