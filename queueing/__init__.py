"""The front end's side of the replica link: dispatch, admission, futures, replica health."""
