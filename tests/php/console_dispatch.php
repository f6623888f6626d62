<?php
// examples/php/dispatch.php as the deferred-event bundle's console command, for
// bench/console_executor.py: `php console_dispatch.php fervo:deferred-event:dispatch DATA` runs
// the same dispatch (Symfony's EventDispatcher and the demo listener) that PHP-FPM runs per
// request, so the two executors are compared on the same work. A job dispatch.php refuses (its
// HTTP 400) exits with status 1 here, as a console command that fails does.

declare(strict_types=1);

if (($argv[1] ?? null) !== 'fervo:deferred-event:dispatch' || count($argv) !== 3) {
    fwrite(STDERR, "usage: console_dispatch.php fervo:deferred-event:dispatch DATA\n");
    exit(64);
}
register_shutdown_function(function (): void {
    $status = http_response_code();
    if (is_int($status) && $status >= 300) {
        exit(1);
    }
});
$_SERVER['DEFERRED_DATA'] = $argv[2];
require __DIR__ . '/../../examples/php/dispatch.php';
