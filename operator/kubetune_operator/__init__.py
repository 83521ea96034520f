"""kubetune operator."""
