//! A fake GPU device plugin speaking the kubelet's device-plugin API (`v1beta1`, gRPC over
//! unix sockets), so that an extra node's kubelet advertises `nvidia.com/gpu` itself and its
//! device manager allocates GPUs to containers, as on a real GPU node with NVIDIA's plugin:
//! the plugin registers with the kubelet, lists its devices (healthy, each with its NUMA
//! node) and answers `Allocate` with the environment NVIDIA's plugin sets
//! (`NVIDIA_VISIBLE_DEVICES`). No container sees a device node; the test ground has no GPU.
//!
//! The kubelet's registration socket is fixed at `/var/lib/kubelet/device-plugins/
//! kubelet.sock`; each GPU node's kubelet and containerd therefore run in a mount namespace
//! of their own where the node's own directory is mounted there (see
//! [`super::procs::Isolation`]). This plugin, in the machine's namespace, reaches the same
//! sockets through the node's directory.
//!
//! The messages are the API's (`k8s.io/kubelet/pkg/apis/deviceplugin/v1beta1/api.proto`),
//! written with prost's derive; the two services are routed by hand, which is what tonic's
//! generated code does.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use hyper_util::rt::TokioIo;
use tonic::codegen::{BoxFuture, Service, http};
use tonic::{Request, Response, Status};
use tonic_prost::ProstCodec;

/// The API version the plugin speaks.
pub const API_VERSION: &str = "v1beta1";
/// The kubelet's registration socket, inside a device-plugin directory.
pub const KUBELET_SOCKET: &str = "kubelet.sock";
/// Where the kubelet looks for plugins' sockets (fixed in the kubelet).
pub const KUBELET_DEVICE_PLUGIN_DIR: &str = "/var/lib/kubelet/device-plugins";
/// The plugin's own socket, in the same directory.
pub const PLUGIN_SOCKET: &str = "sluice-fake-gpu.sock";
pub const GPU_RESOURCE: &str = "nvidia.com/gpu";

#[derive(Clone, PartialEq, prost::Message)]
pub struct Empty {}

#[derive(Clone, PartialEq, prost::Message)]
pub struct DevicePluginOptions {
    #[prost(bool, tag = "1")]
    pub pre_start_required: bool,
    #[prost(bool, tag = "2")]
    pub get_preferred_allocation_available: bool,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct RegisterRequest {
    #[prost(string, tag = "1")]
    pub version: String,
    #[prost(string, tag = "2")]
    pub endpoint: String,
    #[prost(string, tag = "3")]
    pub resource_name: String,
    #[prost(message, optional, tag = "4")]
    pub options: Option<DevicePluginOptions>,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct NumaNode {
    #[prost(int64, tag = "1")]
    pub id: i64,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct TopologyInfo {
    #[prost(message, repeated, tag = "1")]
    pub nodes: Vec<NumaNode>,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct Device {
    #[prost(string, tag = "1")]
    pub id: String,
    #[prost(string, tag = "2")]
    pub health: String,
    #[prost(message, optional, tag = "3")]
    pub topology: Option<TopologyInfo>,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct ListAndWatchResponse {
    #[prost(message, repeated, tag = "1")]
    pub devices: Vec<Device>,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct ContainerAllocateRequest {
    #[prost(string, repeated, tag = "1")]
    pub devices_ids: Vec<String>,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct AllocateRequest {
    #[prost(message, repeated, tag = "1")]
    pub container_requests: Vec<ContainerAllocateRequest>,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct ContainerAllocateResponse {
    #[prost(map = "string, string", tag = "1")]
    pub envs: HashMap<String, String>,
    #[prost(map = "string, string", tag = "4")]
    pub annotations: HashMap<String, String>,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct AllocateResponse {
    #[prost(message, repeated, tag = "1")]
    pub container_responses: Vec<ContainerAllocateResponse>,
}

/// The node's fake GPUs: `count` devices, the first half on NUMA node 0, the rest on 1
/// (two sockets, as on an 8-GPU HGX board).
pub fn devices(node: &str, count: u32) -> Vec<Device> {
    (0..count)
        .map(|i| Device {
            id: gpu_id(node, i),
            health: "Healthy".into(),
            topology: Some(TopologyInfo {
                nodes: vec![NumaNode {
                    id: i64::from(u32::from(count > 1 && i >= count / 2)),
                }],
            }),
        })
        .collect()
}

/// A GPU's device ID, shaped like NVIDIA's UUIDs and unique across the ground.
pub fn gpu_id(node: &str, index: u32) -> String {
    format!("GPU-sluice-{node}-{index}")
}

/// What a container that got `ids` sees: NVIDIA's plugin's variable, and the indices.
pub fn allocate(req: &AllocateRequest) -> AllocateResponse {
    AllocateResponse {
        container_responses: req
            .container_requests
            .iter()
            .map(|c| ContainerAllocateResponse {
                envs: HashMap::from([(
                    "NVIDIA_VISIBLE_DEVICES".to_string(),
                    c.devices_ids.join(","),
                )]),
                annotations: HashMap::new(),
            })
            .collect(),
    }
}

fn options() -> DevicePluginOptions {
    DevicePluginOptions {
        pre_start_required: false,
        get_preferred_allocation_available: false,
    }
}

#[derive(Clone)]
struct DevicePluginService {
    devices: Arc<Vec<Device>>,
}

impl tonic::server::NamedService for DevicePluginService {
    const NAME: &'static str = "v1beta1.DevicePlugin";
}

/// One unary method as a closure.
struct Unary<F>(F);

impl<Req, Resp, F> tonic::server::UnaryService<Req> for Unary<F>
where
    F: Fn(Req) -> Result<Resp, Status>,
    Req: Send + 'static,
    Resp: Send + 'static,
{
    type Response = Resp;
    type Future = std::future::Ready<Result<Response<Resp>, Status>>;
    fn call(&mut self, request: Request<Req>) -> Self::Future {
        std::future::ready((self.0)(request.into_inner()).map(Response::new))
    }
}

/// `ListAndWatch`: the devices once, then the stream stays open (the kubelet takes a
/// closed stream for a plugin gone and marks its devices unhealthy).
struct ListAndWatch(Arc<Vec<Device>>);

type DeviceStream = std::pin::Pin<
    Box<dyn futures::Stream<Item = Result<ListAndWatchResponse, Status>> + Send + 'static>,
>;

impl tonic::server::ServerStreamingService<Empty> for ListAndWatch {
    type Response = ListAndWatchResponse;
    type ResponseStream = DeviceStream;
    type Future = std::future::Ready<Result<Response<DeviceStream>, Status>>;
    fn call(&mut self, _: Request<Empty>) -> Self::Future {
        use futures::StreamExt as _;
        let first = ListAndWatchResponse {
            devices: self.0.as_ref().clone(),
        };
        let stream =
            futures::stream::once(async move { Ok(first) }).chain(futures::stream::pending());
        std::future::ready(Ok(Response::new(Box::pin(stream) as DeviceStream)))
    }
}

impl Service<http::Request<tonic::body::Body>> for DevicePluginService {
    type Response = http::Response<tonic::body::Body>;
    type Error = std::convert::Infallible;
    type Future = BoxFuture<Self::Response, Self::Error>;

    fn poll_ready(
        &mut self,
        _: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Result<(), Self::Error>> {
        std::task::Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: http::Request<tonic::body::Body>) -> Self::Future {
        let devices = self.devices.clone();
        Box::pin(async move {
            // A codec per method: it is typed by the method's messages.
            fn grpc<E, D>() -> tonic::server::Grpc<ProstCodec<E, D>>
            where
                E: prost::Message + Send + 'static,
                D: prost::Message + Default + Send + 'static,
            {
                tonic::server::Grpc::new(ProstCodec::default())
            }
            let resp = match req.uri().path() {
                "/v1beta1.DevicePlugin/GetDevicePluginOptions" => {
                    grpc().unary(Unary(|_: Empty| Ok(options())), req).await
                }
                "/v1beta1.DevicePlugin/ListAndWatch" => {
                    grpc().server_streaming(ListAndWatch(devices), req).await
                }
                "/v1beta1.DevicePlugin/Allocate" => {
                    grpc()
                        .unary(Unary(|r: AllocateRequest| Ok(allocate(&r))), req)
                        .await
                }
                // Neither is advertised in the options, so the kubelet does not call them.
                path => Status::unimplemented(format!("{path}: not offered")).into_http(),
            };
            Ok(resp)
        })
    }
}

/// A gRPC channel to a unix socket.
async fn channel(socket: PathBuf) -> anyhow::Result<tonic::transport::Channel> {
    let ch = tonic::transport::Endpoint::try_from("http://[::1]:1")?
        .connect_timeout(Duration::from_secs(5))
        .connect_with_connector(tower_fn(socket))
        .await?;
    Ok(ch)
}

fn tower_fn(
    socket: PathBuf,
) -> impl Service<
    http::Uri,
    Response = TokioIo<tokio::net::UnixStream>,
    Error = std::io::Error,
    Future = BoxFuture<TokioIo<tokio::net::UnixStream>, std::io::Error>,
> + Clone {
    #[derive(Clone)]
    struct Connect(PathBuf);
    impl Service<http::Uri> for Connect {
        type Response = TokioIo<tokio::net::UnixStream>;
        type Error = std::io::Error;
        type Future = BoxFuture<Self::Response, Self::Error>;
        fn poll_ready(
            &mut self,
            _: &mut std::task::Context<'_>,
        ) -> std::task::Poll<Result<(), Self::Error>> {
            std::task::Poll::Ready(Ok(()))
        }
        fn call(&mut self, _: http::Uri) -> Self::Future {
            let path = self.0.clone();
            Box::pin(async move { Ok(TokioIo::new(tokio::net::UnixStream::connect(path).await?)) })
        }
    }
    Connect(socket)
}

/// Registers the plugin with the kubelet whose registration socket is in `dir`.
async fn register(dir: &Path) -> anyhow::Result<()> {
    let mut grpc = tonic::client::Grpc::new(channel(dir.join(KUBELET_SOCKET)).await?);
    grpc.ready().await?;
    let req = RegisterRequest {
        version: API_VERSION.into(),
        endpoint: PLUGIN_SOCKET.into(),
        resource_name: GPU_RESOURCE.into(),
        options: Some(options()),
    };
    grpc.unary::<RegisterRequest, Empty, _>(
        Request::new(req),
        http::uri::PathAndQuery::from_static("/v1beta1.Registration/Register"),
        ProstCodec::default(),
    )
    .await?;
    Ok(())
}

fn inode(path: &Path) -> Option<u64> {
    use std::os::unix::fs::MetadataExt as _;
    std::fs::metadata(path).ok().map(|m| m.ino())
}

/// Serves the plugin in `dir` (the node's device-plugin directory as this process sees it)
/// and registers it with the kubelet, again whenever the kubelet's socket is recreated (a
/// kubelet restart forgets its plugins). Runs until the task is dropped.
pub async fn serve(dir: PathBuf, node: String, gpus: u32) -> anyhow::Result<()> {
    let socket = dir.join(PLUGIN_SOCKET);
    let _ = std::fs::remove_file(&socket);
    let listener = tokio::net::UnixListener::bind(&socket)
        .with_context(|| format!("binding {}", socket.display()))?;
    let service = DevicePluginService {
        devices: Arc::new(devices(&node, gpus)),
    };
    let server = tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(service)
            .serve_with_incoming(tokio_stream::wrappers::UnixListenerStream::new(listener)),
    );
    let kubelet = dir.join(KUBELET_SOCKET);
    let mut registered_with: Option<u64> = None;
    loop {
        if server.is_finished() {
            anyhow::bail!("the device plugin's server stopped");
        }
        let now = inode(&kubelet);
        if now.is_some() && now != registered_with {
            match register(&dir).await {
                Ok(()) => {
                    tracing::info!(%node, gpus, "fake GPU device plugin registered with the kubelet");
                    registered_with = now;
                }
                Err(e) => {
                    tracing::warn!(%node, error = %e, "device plugin registration failed; retrying")
                }
            }
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use prost::Message as _;

    #[test]
    fn devices_split_across_two_numa_nodes() {
        let d = devices("local-1", 8);
        assert_eq!(d.len(), 8);
        assert_eq!(d[0].id, "GPU-sluice-local-1-0");
        let numa: Vec<i64> = d
            .iter()
            .map(|d| d.topology.as_ref().unwrap().nodes[0].id)
            .collect();
        assert_eq!(numa, [0, 0, 0, 0, 1, 1, 1, 1]);
        assert!(d.iter().all(|d| d.health == "Healthy"));
    }

    #[test]
    fn allocate_sets_nvidia_visible_devices_per_container() {
        let r = allocate(&AllocateRequest {
            container_requests: vec![ContainerAllocateRequest {
                devices_ids: vec!["a".into(), "b".into()],
            }],
        });
        assert_eq!(
            r.container_responses[0].envs["NVIDIA_VISIBLE_DEVICES"],
            "a,b"
        );
    }

    #[test]
    fn messages_use_the_apis_field_numbers() {
        // RegisterRequest{version:"v", endpoint:"e", resource_name:"r", options:{pre_start_required:true}}
        let bytes = RegisterRequest {
            version: "v".into(),
            endpoint: "e".into(),
            resource_name: "r".into(),
            options: Some(DevicePluginOptions {
                pre_start_required: true,
                get_preferred_allocation_available: false,
            }),
        }
        .encode_to_vec();
        assert_eq!(
            bytes,
            [
                0x0a, 1, b'v', 0x12, 1, b'e', 0x1a, 1, b'r', 0x22, 2, 0x08, 1
            ]
        );
    }
}

#[cfg(test)]
mod grpc_tests {
    use super::*;

    /// The plugin's gRPC services over a unix socket, as the kubelet calls them.
    #[tokio::test]
    async fn serves_options_devices_and_allocations_over_its_socket() {
        let dir = std::env::temp_dir().join(format!("sluice-dp-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let serving = tokio::spawn(serve(dir.clone(), "local-7".into(), 4));
        let socket = dir.join(PLUGIN_SOCKET);
        for _ in 0..100 {
            if socket.exists() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let mut grpc = tonic::client::Grpc::new(channel(socket).await.unwrap());
        grpc.ready().await.unwrap();
        let opts: DevicePluginOptions = grpc
            .unary(
                Request::new(Empty {}),
                http::uri::PathAndQuery::from_static(
                    "/v1beta1.DevicePlugin/GetDevicePluginOptions",
                ),
                ProstCodec::default(),
            )
            .await
            .unwrap()
            .into_inner();
        assert_eq!(opts, options());
        grpc.ready().await.unwrap();
        let mut stream = grpc
            .server_streaming::<Empty, ListAndWatchResponse, _>(
                Request::new(Empty {}),
                http::uri::PathAndQuery::from_static("/v1beta1.DevicePlugin/ListAndWatch"),
                ProstCodec::default(),
            )
            .await
            .unwrap()
            .into_inner();
        let first = stream.message().await.unwrap().unwrap();
        assert_eq!(first.devices, devices("local-7", 4));
        grpc.ready().await.unwrap();
        let alloc: AllocateResponse = grpc
            .unary(
                Request::new(AllocateRequest {
                    container_requests: vec![ContainerAllocateRequest {
                        devices_ids: vec![gpu_id("local-7", 2)],
                    }],
                }),
                http::uri::PathAndQuery::from_static("/v1beta1.DevicePlugin/Allocate"),
                ProstCodec::default(),
            )
            .await
            .unwrap()
            .into_inner();
        assert_eq!(
            alloc.container_responses[0].envs["NVIDIA_VISIBLE_DEVICES"],
            "GPU-sluice-local-7-2"
        );
        serving.abort();
        let _ = std::fs::remove_dir_all(&dir);
    }
}
