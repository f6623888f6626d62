<?php
// A dispatch script compatible with the fervo deferred-event bundle, run by PHP-FPM per job.
//
// The job's data arrives in the DEFERRED_DATA FastCGI param ($_SERVER) or, when large, as an
// urlencoded POST field ($_POST). It is base64(serialize($event)); the event is handed to
// Symfony's EventDispatcher under $event->getName() (the bundle's convention; else its class).
// A listener's exception is left uncaught on purpose: PHP-FPM then answers "Status: 500" with
// the message on STDERR, which is how fastworker knows the job failed.

declare(strict_types=1);

require __DIR__ . '/listeners.php';

function fastworker_reject(string $why): never
{
    http_response_code(400);
    error_log('dispatch.php: ' . $why);
    echo $why, "\n";
    exit;
}

$data = null;
if (isset($_SERVER['DEFERRED_DATA'])) {
    $data = $_SERVER['DEFERRED_DATA'];
} elseif (isset($_POST['DEFERRED_DATA'])) {
    $data = $_POST['DEFERRED_DATA'];
}
if (!is_string($data) || $data === '') {
    fastworker_reject('no DEFERRED_DATA in the request');
}

$serialized = base64_decode(trim($data), true);
if ($serialized === false) {
    fastworker_reject(sprintf('DEFERRED_DATA is not base64 (%d bytes)', strlen($data)));
}

$event = @unserialize($serialized, ['allowed_classes' => FASTWORKER_DEMO_EVENT_CLASSES]);
if (!is_object($event) || $event instanceof __PHP_Incomplete_Class) {
    fastworker_reject(sprintf(
        'DEFERRED_DATA is not a serialized event of a known class (%d bytes)',
        strlen($serialized)
    ));
}

$name = method_exists($event, 'getName') ? $event->getName() : get_class($event);
fastworker_demo_dispatcher()->dispatch($event, $name);
echo "dispatched $name\n";
