"""Pipeline stages; each reads artifacts of earlier stages and writes its own folder."""
