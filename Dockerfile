# A container image of the gateway (issue 13): NOT built or tested here (no container runtime
# on the development machines); the binary and the deployment it runs in are.
#
#   docker build -t stox .
#   docker run -p 8080:8080 -e STOX_JWT_SECRET=... stox serve --host 0.0.0.0 --demo-workers

# -- build: the one-file binary ------------------------------------------------------------
FROM python:3.13-slim-bookworm AS build
RUN apt-get update && apt-get install -y --no-install-recommends git binutils \
    && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY requirements.txt requirements-binary.txt pyproject.toml ./
RUN pip install --no-cache-dir -r requirements-binary.txt
COPY . .
# the build context must include .git: the binary carries the commit it was built from
RUN python packaging/build.py

# -- run: the binary alone, as a user without privileges ------------------------------------
FROM debian:bookworm-slim
RUN useradd --system --uid 10001 --home-dir /var/lib/stox --create-home stox
COPY --from=build /src/dist/stox /usr/local/bin/stox
USER stox
WORKDIR /var/lib/stox
ENV STOX_STORAGE_URL=sqlite:////var/lib/stox/stox.db
EXPOSE 8080
# no curl in the image: bash asks /healthz over /dev/tcp
HEALTHCHECK --interval=10s --timeout=3s --start-period=20s --retries=3 \
    CMD bash -c 'exec 3<>/dev/tcp/127.0.0.1/8080 && printf "GET /healthz HTTP/1.0\r\n\r\n" >&3 && grep -q "200 OK" <&3'
ENTRYPOINT ["/usr/local/bin/stox"]
CMD ["serve", "--host", "0.0.0.0"]
