"""Quality control, figures, the methods text and the participant report. They read what a run wrote
(the outputs and the run record), never the steps or the registration engines."""
