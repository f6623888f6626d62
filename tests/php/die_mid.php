<?php
// Starts its answer, then its FPM child dies: the connection is lost mid-response.
echo str_repeat("partial output\n", 10);
while (ob_get_level() > 0) {
    ob_end_flush();
}
flush();
posix_kill(getmypid(), 9);
sleep(5);
