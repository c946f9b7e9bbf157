"""The application on top: the validated request, the generation path, the run with its report,
reading inputs and writing outputs, and the command line."""
