"""What personal-data detection costs per request: `gateway.pii.scan_all` over a 32k-token conversation.

Builds a chat conversation of about 128 KB (roughly 32k tokens at four characters a token) from
seeded English and Spanish prose, sentences full of numbers that are not personal data (dates,
times, versions, IP addresses, amounts, order and invoice numbers, UUIDs, hashes) and code snippets:
once clean, once with one value of every kind sprinkled in, and once made of the numeric sentences
and snippets alone (a paste of logs and data, with three times the digits). Checks that the
clean ones scan clean and the other finds every kind, then times full-conversation scans with
`scan_all` and prints the median, the p99 and the throughput.

    .venv/bin/python bench/pii.py [--rounds 50] [--seed 7]

In-process and CPU-only; each row stops after --rounds scans (at most 1000) or 2 s.
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from gateway.pii import KINDS, scan_all  # noqa: E402

TARGET_CHARS = 128_000
MAX_ROUNDS = 1000
MAX_SECONDS = 2.0
# name, with PII, share of sentences without numbers; the last row is a paste of logs and data.
ROWS = (("chat", False, 0.7), ("chat with PII", True, 0.7), ("numbers only", False, 0.0))

PROSE_ENGLISH = (
    "Could you tell me why the cancel button does nothing when the form is still loading?",
    "I think the problem is in how the middleware handles streaming responses after a timeout.",
    "Sure, here is a shorter version of the paragraph that keeps the tone a bit more formal.",
    "The hotel booking flow works on desktop, but on the phone the date picker overlaps the footer.",
    "Let me know if you want me to rewrite the tests so that each one checks a single behaviour.",
    "That makes sense; the cache should be invalidated whenever the configuration file changes.",
    "We could also move the retry logic into its own module so the client stays small and readable.",
    "Thanks, that fixed it. Now the documentation build complains about a missing reference.",
    "In short: keep the public interface stable, and put the experimental parts behind a flag.",
    "Please summarise the meeting notes and list the open questions for the mobile team.",
    "The medical records project is on hold until the legal review is finished.",
    "Honestly, the simplest option is to log the error, return a clear message and move on.",
    "Can you explain the difference between a process and a thread as if I were new to this?",
    "The spreadsheet has one cell per customer and a column for the preferred contact channel.",
)
PROSE_SPANISH = (
    "¿Me puedes explicar por qué el servidor tarda tanto en responder cuando hay muchos usuarios?",
    "La historia del proyecto está en el documento compartido, junto con las decisiones de diseño.",
    "Creo que conviene separar la lógica de reintentos del cliente para que sea más fácil de probar.",
    "Perfecto, ya funciona. Ahora el informe sale en blanco cuando no hay datos del mes anterior.",
    "Resume el correo en tres frases y mantén un tono cordial pero directo, por favor.",
    "El equipo del móvil necesita la nueva versión de la interfaz antes de la reunión del jueves.",
    "No hace falta reescribirlo todo; basta con cambiar la función que calcula los totales.",
    "Si el usuario cancela el pedido, el sistema debería devolver el importe de forma automática.",
    "La documentación dice que el parámetro es opcional, pero sin él la petición falla.",
    "Gracias por la explicación; ahora entiendo por qué la consulta era tan lenta.",
)
ENGLISH = (
    "The build from {date} failed at step {small} of {small2} because the worker ran out of memory.",
    "I upgraded the client to version {version} and the latency dropped to {ms} ms on average.",
    "Order {order} was shipped on {date} and should arrive before {date2}, tracking says {small} stops left.",
    "The invoice {invoice} for {amount} USD is still open; finance asked for it by {time} on Friday.",
    "Can you check why {ip} keeps timing out on port {port}? It started around {time} UTC.",
    "We processed {big} events yesterday, about {percent}% more than the week before.",
    "Commit {hash} introduced the regression; the request id was {uuid}.",
    "Set the retry budget to {small} attempts with a backoff of {ms} ms and a ceiling of {small2} seconds.",
    "Our Windows runners are on build {winver}, which is why the path handling differs.",
    "The ISBN of the book you mentioned is {isbn}, published in {year}.",
    "Between {year} and {year2} the dataset grew from {big} rows to {big2} rows.",
    "It logged {timestamp} as the first error and then nothing for {small} minutes.",
)
SPANISH = (
    "El despliegue del {date} falló en el paso {small} de {small2} porque el proceso se quedó sin memoria.",
    "Actualicé el cliente a la versión {version} y la latencia bajó a {ms} ms de media.",
    "El pedido {order} salió el {date} y debería llegar antes del {date2}, quedan {small} paradas.",
    "La factura {invoice} por {amount_es} € sigue abierta; contabilidad la necesita a las {time}.",
    "¿Puedes revisar por qué {ip} no responde en el puerto {port}? Empezó hacia las {time}.",
    "Ayer procesamos {big} eventos, un {percent} % más que la semana anterior.",
    "El commit {hash} introdujo el error; el identificador de la petición era {uuid}.",
    "Entre {year} y {year2} la tabla pasó de {big} filas a {big2} filas, según el informe.",
    "Revisa los registros del {date_es} y compara con la versión {version} antes de reiniciar.",
    "El servidor de staging tiene {small} núcleos y {small2} GB de memoria, y el disco está al {percent} %.",
)
CODE = (
    "```python\ndef backoff(attempt: int) -> float:\n    return min({small2}.0, 0.{small} * 2 ** attempt)\n\n"
    "for attempt in range({small}):\n    time.sleep(backoff(attempt))\n```",
    '```json\n{{"id": "{uuid}", "created": {epoch}, "model": "llama3:{small}b", "usage": '
    '{{"prompt_tokens": {big}, "completion_tokens": {ms}}}}}\n```',
    "```\n{timestamp} INFO  worker-{small} started pid={port} version={version}\n"
    "{timestamp} WARN  upstream {ip}:{port} slow ({ms} ms)\n{timestamp} ERROR request {uuid} failed\n```",
    "```bash\ncurl -s http://{ip}:{port}/v1/models | jq '.data[{small}]'\ngit checkout {hash}\n```",
)
PII = (
    "You can reach me at lucia.fernandez@example.org if anything breaks.",
    "Mi teléfono es +54 9 11 4567-8901, llamame después de las 18.",
    "Charge it to my card 4111 1111 1111 1111, expiry 09/27.",
    "Transfiere el alquiler a ES91 2100 0418 4502 0005 1332, como siempre.",
    "For the background check my SSN is 536-22-1234.",
    "Mi DNI es 12.345.678 y mi CUIT 20-12345678-6, por si lo pide la AFIP.",
    "El contrato está a nombre de mi madre, DNI 87654321X.",
    "Mi NIE es X1234567L, lo renové el año pasado.",
    "The discharge summary lists MRN: 00482913 for the patient.",
)


def fill(template: str, rng: random.Random) -> str:
    def number(low: int, high: int) -> int:
        return rng.randint(low, high)

    year = number(2015, 2026)
    return template.format(
        date=f"{year}-{number(1, 12):02}-{number(1, 28):02}",
        date2=f"{number(1, 28):02}/{number(1, 12):02}/{year}",
        date_es=f"{number(1, 28)} de enero de {year}",
        time=f"{number(0, 23):02}:{number(0, 59):02}",
        timestamp=f"{year}-{number(1, 12):02}-{number(1, 28):02}T{number(0, 23):02}:{number(0, 59):02}:"
        f"{number(0, 59):02}Z",
        version=f"{number(0, 4)}.{number(0, 20)}.{number(0, 9)}",
        winver=f"10.0.{number(17000, 22631)}.{number(1000, 4000)}",
        ms=number(3, 900),
        small=number(1, 9),
        small2=number(10, 60),
        order=f"#{number(100000, 999999999999)}",
        invoice=f"INV-{year}-{number(1, 999999):06}",
        amount=f"{number(1, 9)},{number(100, 999)},{number(100, 999)}.{number(0, 99):02}",
        amount_es=f"{number(1, 999)}.{number(100, 999)},{number(0, 99):02}",
        ip=f"{number(10, 223)}.{number(0, 255)}.{number(0, 255)}.{number(1, 254)}",
        port=number(1024, 65535),
        big=f"{number(1000, 999999999):,}",
        big2=number(1000, 999999999),
        percent=number(1, 99),
        hash="".join(rng.choices("0123456789abcdef", k=40)),
        uuid=f"{rng.getrandbits(32):08x}-{rng.getrandbits(16):04x}-4{rng.getrandbits(12):03x}-"
        f"a{rng.getrandbits(12):03x}-{rng.getrandbits(48):012x}",
        isbn=f"978-{number(0, 9)}-{number(10, 99)}-{number(100000, 999999)}-{number(0, 9)}",
        epoch=number(1_600_000_000, 1_800_000_000),
        year=year,
        year2=year + number(1, 5),
    )


def message(rng: random.Random, prose_share: float) -> str:
    english = rng.random() < 0.5
    sentences = []
    for _ in range(rng.randint(2, 9)):
        if rng.random() < prose_share:
            sentences.append(rng.choice(PROSE_ENGLISH if english else PROSE_SPANISH))
        else:
            sentences.append(fill(rng.choice(ENGLISH if english else SPANISH), rng))
    if rng.random() < 0.3:
        sentences.insert(rng.randint(0, len(sentences)), "\n" + fill(rng.choice(CODE), rng) + "\n")
    return " ".join(sentences)


def conversation(seed: int, with_pii: bool, prose_share: float = 0.7) -> list[str]:
    rng = random.Random(seed)
    messages: list[str] = []
    size = 0
    while size < TARGET_CHARS:
        messages.append(message(rng, prose_share))
        size += len(messages[-1])
    if with_pii:
        for value in PII:
            at = rng.randrange(len(messages))
            messages[at] = f"{messages[at]} {value}"
    return messages


def timed(messages: list[str], rounds: int) -> list[float]:
    scan_all(messages)  # warm up
    samples: list[float] = []
    begun = time.perf_counter()
    while len(samples) < rounds and time.perf_counter() - begun < MAX_SECONDS:
        started = time.perf_counter()
        scan_all(messages)
        samples.append(time.perf_counter() - started)
    return samples


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=50)
    parser.add_argument("--seed", type=int, default=7)
    args = parser.parse_args()
    rounds = max(1, min(args.rounds, MAX_ROUNDS))

    header = ("conversation", "msgs", "KB", "digits", "median ms", "p99 ms", "MB/s")
    print("{:14} {:>4} {:>4} {:>6} {:>9} {:>6} {:>4}  found".format(*header))
    for name, with_pii, prose_share in ROWS:
        messages = conversation(args.seed, with_pii, prose_share)
        found = scan_all(messages)
        expected = KINDS if with_pii else ()
        if found != expected:
            sys.exit(f"{name}: found {found}, expected {expected}")
        text = "".join(messages)
        size = len(text.encode())
        digits = sum(char.isdigit() for char in text) / len(text)
        samples = timed(messages, rounds)
        median = statistics.median(samples)
        p99 = statistics.quantiles(samples, n=100, method="inclusive")[98] if len(samples) > 1 else median
        print(
            f"{name:14} {len(messages):>4} {size / 1000:>4.0f} {digits:>6.1%} {median * 1000:>9.2f} "
            f"{p99 * 1000:>6.2f} {size / median / 1e6:>4.0f}  {len(found)} kinds"
        )


if __name__ == "__main__":
    main()
